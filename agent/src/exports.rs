//! The protected volumes as NBD exports: each request is handed to the group's write
//! pipeline, which admits it in arrival order (see `pipeline`). While the replica is primary
//! for a group (it is failed over there), its exports are read-only: every request is checked
//! against it, so writes, trims and zero-writes of connections already open get EPERM too.
//!
//! An export holds its group weakly and can be *retired* (`cdp-agent unprotect`): from then on
//! it is not listed or found by new clients, and every request of a connection still open
//! gets `ESHUTDOWN`, so that nothing keeps the group (and its devices) alive once the agent
//! lets go of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};

use cdp_shared::batch::RecordKind;
use cdp_shared::cause::Primary;
use cdp_shared::nbd::{Export, ExportError, ExportResult, ExportSet};
use cdp_shared::types::VolumeId;
use tokio_util::either::Either;

use crate::pipeline::Group;

pub struct VolumeExport {
    group: Weak<Group>,
    volume: VolumeId,
    size: u64,
    retired: AtomicBool,
}

type Refused<T> = std::future::Ready<ExportResult<T>>;

impl VolumeExport {
    /// The group, unless the export is retired.
    fn live(&self) -> Option<Arc<Group>> {
        if self.retired.load(Ordering::Acquire) {
            return None;
        }
        self.group.upgrade()
    }

    fn refused<T>() -> Refused<T> {
        std::future::ready(Err(ExportError::Shutdown))
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.size
    }
    /// Read-only while the replica is primary for the group (it is failed over there).
    fn read_only(&self) -> bool {
        self.group
            .upgrade()
            .is_some_and(|g| g.primary() == Primary::Replica)
    }
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = ExportResult<Vec<u8>>> + Send + 'static {
        match self.live() {
            Some(g) => Either::Left(g.read(self.volume, offset, len)),
            None => Either::Right(Self::refused()),
        }
    }
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        match self.live() {
            Some(g) => Either::Left(g.write(self.volume, offset, data, fua)),
            None => Either::Right(Self::refused()),
        }
    }
    fn flush(&self) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        match self.live() {
            Some(g) => Either::Left(g.flush_volume(self.volume)),
            None => Either::Right(Self::refused()),
        }
    }
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        match self.live() {
            Some(g) => {
                Either::Left(g.zero(self.volume, offset, u64::from(len), RecordKind::Trim, fua))
            }
            None => Either::Right(Self::refused()),
        }
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = ExportResult<()>> + Send + 'static {
        match self.live() {
            Some(g) => {
                Either::Left(g.zero(self.volume, offset, u64::from(len), RecordKind::Zero, fua))
            }
            None => Either::Right(Self::refused()),
        }
    }
}

/// Every protected volume, by name.
pub struct VolumeExports {
    by_name: RwLock<BTreeMap<String, Arc<VolumeExport>>>,
}

impl VolumeExports {
    pub fn new(groups: &[Arc<Group>]) -> VolumeExports {
        let mut by_name = BTreeMap::new();
        for g in groups {
            for v in &g.volumes {
                by_name.insert(
                    v.name.clone(),
                    Arc::new(VolumeExport {
                        group: Arc::downgrade(g),
                        volume: v.id,
                        size: v.size,
                        retired: AtomicBool::new(false),
                    }),
                );
            }
        }
        VolumeExports {
            by_name: RwLock::new(by_name),
        }
    }

    /// Stops serving the volumes of `group`: they are no longer found, and every request on a
    /// connection to one of them gets `ESHUTDOWN`.
    pub fn retire(&self, group: &Group) {
        let mut by_name = self.by_name.write().unwrap_or_else(|p| p.into_inner());
        for v in &group.volumes {
            if let Some(e) = by_name.remove(&v.name) {
                e.retired.store(true, Ordering::Release);
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<VolumeExport>>> {
        self.by_name.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl ExportSet for VolumeExports {
    type Export = VolumeExport;
    fn get(&self, name: &str) -> Option<Arc<VolumeExport>> {
        let by_name = self.read();
        if name.is_empty() && by_name.len() == 1 {
            return by_name.values().next().cloned();
        }
        by_name.get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }
}
