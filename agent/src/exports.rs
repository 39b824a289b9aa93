//! The protected volumes as NBD exports: each request is handed to the group's write
//! pipeline, which admits it in arrival order (see `write_pipeline`).

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_shared::batch::RecordKind;
use cdp_shared::nbd::{Export, ExportResult, ExportSet};
use cdp_shared::types::VolumeId;

use crate::write_pipeline::Group;

pub struct VolumeExport {
    group: Arc<Group>,
    volume: VolumeId,
    size: u64,
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static {
        self.group.read(self.volume, offset, len)
    }
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.group.write(self.volume, offset, data, fua)
    }
    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.group.flush_volume(self.volume)
    }
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.group
            .zero(self.volume, offset, u64::from(len), RecordKind::Trim, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        self.group
            .zero(self.volume, offset, u64::from(len), RecordKind::Zero, fua)
    }
}

/// Every protected volume, by name.
pub struct VolumeExports {
    by_name: BTreeMap<String, Arc<VolumeExport>>,
}

impl VolumeExports {
    pub fn new(groups: &[Arc<Group>]) -> VolumeExports {
        let mut by_name = BTreeMap::new();
        for g in groups {
            for v in &g.volumes {
                by_name.insert(
                    v.name.clone(),
                    Arc::new(VolumeExport {
                        group: g.clone(),
                        volume: v.id,
                        size: v.size,
                    }),
                );
            }
        }
        VolumeExports { by_name }
    }
}

impl ExportSet for VolumeExports {
    type Export = VolumeExport;
    fn get(&self, name: &str) -> Option<Arc<VolumeExport>> {
        if name.is_empty() && self.by_name.len() == 1 {
            return self.by_name.values().next().cloned();
        }
        self.by_name.get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }
}
