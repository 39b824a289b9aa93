//! The NBD wire protocol as plain values and functions over bytes, with no I/O: the constants
//! of the NetworkBlockDevice `doc/proto.md` specification, parsing of what a client sends
//! (client flags, option headers and payloads, request headers), the server's decisions
//! during option haggling ([`handle_option`], and [`refuse_option`] for a connection over the
//! server's limit) and for each request ([`check_request`]), and encoding of what the server sends (greeting, option replies, export info, simple replies).
//!
//! Every length a client announces is checked against a named limit before anything is
//! allocated for it. Parsers never panic on any input; a proptest feeds them random bytes.
//! The server shell in [`super::server`] only moves these bytes over a socket.

use crate::types::NBD_REQUEST_BYTES_MAX;

// ---------------------------------------------------------------------------------------------
// Magics.

/// `NBDMAGIC`, the first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`], and by the client before every option.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (not sent: structured replies are not implemented).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Client flags this server understands; any other bit closes the connection.
pub const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits).

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options.

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// Information types of `NBD_REP_INFO`.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and command flags.

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------------
// Error values of a reply (Linux errno numbers, as the specification fixes them).

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Sizes and limits.

/// NBDMAGIC + IHAVEOPT + handshake flags.
pub const GREETING_BYTES: usize = 8 + 8 + 2;
/// Client flags after the greeting.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// IHAVEOPT + option + length.
pub const OPTION_HEADER_BYTES: usize = 8 + 4 + 4;
/// Magic + option + reply type + length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 8 + 4 + 4 + 4;
/// Magic + flags + type + handle + offset + length.
pub const REQUEST_HEADER_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4;
/// Magic + error + handle.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 4 + 4 + 8;
/// Reserved zeroes after an `NBD_OPT_EXPORT_NAME` reply unless the client set NO_ZEROES.
pub const EXPORT_NAME_REPLY_ZEROES_BYTES: usize = 124;

/// Largest option payload accepted; a longer one closes the connection. The largest payload
/// this server understands is an INFO/GO request: a 4096-byte name plus a few info requests.
pub const OPTION_PAYLOAD_BYTES_MAX: u32 = 64 << 10;
/// Longest string (export name) the specification allows.
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// Advertised minimum block size: any byte offset and length work.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Advertised preferred block size.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Advertised maximum block size: the largest READ or WRITE payload the server accepts.
pub const BLOCK_SIZE_MAX: u32 = NBD_REQUEST_BYTES_MAX;

const _: () = assert!(OPTION_PAYLOAD_BYTES_MAX as usize >= 4 + EXPORT_NAME_BYTES_MAX + 2 + 2 * 16);
const _: () = assert!(BLOCK_SIZE_MIN.is_power_of_two() && BLOCK_SIZE_MIN <= 1 << 16);
const _: () = assert!(BLOCK_SIZE_PREFERRED.is_power_of_two() && BLOCK_SIZE_PREFERRED >= 512);
const _: () = assert!(BLOCK_SIZE_PREFERRED >= BLOCK_SIZE_MIN);
const _: () = assert!(BLOCK_SIZE_MAX.is_multiple_of(BLOCK_SIZE_MIN));
const _: () = assert!(BLOCK_SIZE_MAX >= BLOCK_SIZE_PREFERRED);
// The specification asks servers to accept at least 1 MiB requests when the export is that large.
const _: () = assert!(BLOCK_SIZE_MAX >= 1 << 20);

// ---------------------------------------------------------------------------------------------
// Errors.

/// A client broke the protocol in a way that ends the connection (during the handshake, or in
/// the framing of a request), or sent an option payload that is answered with an error.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("truncated {what}: need {needed} bytes, got {got}")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("client flags {0:#x} carry bits this server does not know")]
    UnknownClientFlags(u32),
    #[error("option {option} announces {length} bytes of data, more than the {max}-byte limit")]
    OptionTooLong { option: u32, length: u32, max: u32 },
    #[error("export name of {length} bytes is longer than {max}")]
    NameTooLong { length: usize, max: usize },
    #[error("export name is not valid UTF-8")]
    NameNotUtf8,
    #[error("export name contains a NUL byte")]
    NameContainsNul,
    #[error("option {option} must not carry data, got {length} bytes")]
    UnexpectedData { option: u32, length: usize },
    #[error("option payload is {actual} bytes but its fields need {expected}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("no export named {0:?}")]
    UnknownExport(String),
}

/// Why a well-framed request is refused; the reply carries [`RequestError::nbd_errno`] and the
/// connection goes on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("command {0} is not supported")]
    UnsupportedCommand(u16),
    #[error("command flags {flags:#x} are not valid for command {command}")]
    BadFlags { command: u16, flags: u16 },
    #[error("length {length} exceeds the maximum block size {max}")]
    TooLarge { length: u32, max: u32 },
    #[error("write of {length} bytes at {offset} goes past the end of the {size}-byte export")]
    WritePastEnd { offset: u64, length: u32, size: u64 },
    #[error("request of {length} bytes at {offset} goes past the end of the {size}-byte export")]
    PastEnd { offset: u64, length: u32, size: u64 },
    #[error("export is read-only")]
    ReadOnly,
}

impl RequestError {
    /// The error value of the reply, as the specification's "Error values" section says:
    /// ENOSPC for a write or write-zeroes past the end, EPERM for a write, trim or zero on a
    /// read-only export, EINVAL for everything else (unknown command or flag, a read or trim
    /// past the end, a READ/WRITE longer than the advertised maximum block size). EOVERFLOW is
    /// reserved by the specification for reads with the DF flag, which is not offered.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            RequestError::WritePastEnd { .. } => NBD_ENOSPC,
            RequestError::ReadOnly => NBD_EPERM,
            RequestError::UnsupportedCommand(_)
            | RequestError::BadFlags { .. }
            | RequestError::TooLarge { .. }
            | RequestError::PastEnd { .. } => NBD_EINVAL,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small big-endian readers over a slice, each bounded.

struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.bytes.len() < n {
            return Err(ProtoError::Truncated {
                what: self.what,
                needed: n,
                got: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// What the client announced in its 32-bit flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    /// The client asked not to receive the 124 zero bytes after an EXPORT_NAME reply.
    pub no_zeroes: bool,
}

/// Parses the client flags that follow the greeting. Unknown bits are an error: the
/// specification makes the server drop such a connection.
pub fn parse_client_flags(bytes: &[u8]) -> Result<ClientFlags, ProtoError> {
    let raw = Reader::new(bytes, "client flags").u32()?;
    if raw & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(ProtoError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// Appends the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
}

/// The fixed part of an option the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    /// Payload bytes that follow; already checked against [`OPTION_PAYLOAD_BYTES_MAX`].
    pub length: u32,
}

/// Parses an option header; a bad magic or a payload longer than
/// [`OPTION_PAYLOAD_BYTES_MAX`] is an error that ends the connection.
pub fn parse_option_header(bytes: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(bytes, "option header");
    let magic = r.u64()?;
    let option = r.u32()?;
    let length = r.u32()?;
    if magic != NBD_IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
        });
    }
    if length > OPTION_PAYLOAD_BYTES_MAX {
        return Err(ProtoError::OptionTooLong {
            option,
            length,
            max: OPTION_PAYLOAD_BYTES_MAX,
        });
    }
    Ok(OptionHeader { option, length })
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// The `NBD_INFO_*` types the client asked for, in its order.
    pub info_requests: Vec<u16>,
}

/// An option, parsed from its number and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    /// Any other option number; its payload is ignored.
    Unknown(u32),
}

fn parse_name(bytes: &[u8]) -> Result<String, ProtoError> {
    if bytes.len() > EXPORT_NAME_BYTES_MAX {
        return Err(ProtoError::NameTooLong {
            length: bytes.len(),
            max: EXPORT_NAME_BYTES_MAX,
        });
    }
    if bytes.contains(&0) {
        return Err(ProtoError::NameContainsNul);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProtoError::NameNotUtf8)
}

fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut r = Reader::new(payload, "INFO/GO payload");
    let name_len = r.u32()? as usize;
    if name_len > EXPORT_NAME_BYTES_MAX {
        return Err(ProtoError::NameTooLong {
            length: name_len,
            max: EXPORT_NAME_BYTES_MAX,
        });
    }
    let name = parse_name(r.take(name_len)?)?;
    let count = r.u16()? as usize;
    let expected = 4 + name_len + 2 + 2 * count;
    if payload.len() != expected {
        return Err(ProtoError::LengthMismatch {
            expected,
            actual: payload.len(),
        });
    }
    let mut info_requests = Vec::with_capacity(count);
    for _ in 0..count {
        info_requests.push(r.u16()?);
    }
    Ok(InfoRequest {
        name,
        info_requests,
    })
}

/// Parses an option's payload. The payload has already been bounded by
/// [`parse_option_header`].
pub fn parse_option(option: u32, payload: &[u8]) -> Result<ClientOption, ProtoError> {
    match option {
        NBD_OPT_EXPORT_NAME => parse_name(payload).map(ClientOption::ExportName),
        // The specification asks the server to ignore data sent with ABORT.
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST if payload.is_empty() => Ok(ClientOption::List),
        NBD_OPT_LIST => Err(ProtoError::UnexpectedData {
            option,
            length: payload.len(),
        }),
        NBD_OPT_INFO => parse_info_request(payload).map(ClientOption::Info),
        NBD_OPT_GO => parse_info_request(payload).map(ClientOption::Go),
        // Answered with ERR_UNSUP whatever it carries.
        NBD_OPT_STRUCTURED_REPLY => Ok(ClientOption::StructuredReply),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Size and access of an export, as the handshake announces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
}

/// The transmission flags announced for an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    let flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_TRIM
        | NBD_FLAG_SEND_WRITE_ZEROES
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags | NBD_FLAG_READ_ONLY
    } else {
        flags
    }
}

/// Appends one fixed-newstyle option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    // Every caller sends at most a bounded name or message; nothing here nears 4 GiB.
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply to `option` with a message for a human.
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & NBD_REP_FLAG_ERROR != 0);
    let message = truncate_utf8(message, EXPORT_NAME_BYTES_MAX);
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Appends an `NBD_REP_SERVER` reply naming one export.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    encode_option_reply(out, NBD_OPT_LIST, NBD_REP_SERVER, &data);
}

/// Appends an `NBD_REP_INFO` reply of type `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, info: ExportInfo) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&info.size.to_be_bytes());
    data[10..12].copy_from_slice(&transmission_flags(info.read_only).to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &data);
}

/// Appends an `NBD_REP_INFO` reply of type `NBD_INFO_BLOCK_SIZE` with this server's limits.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&BLOCK_SIZE_MIN.to_be_bytes());
    data[6..10].copy_from_slice(&BLOCK_SIZE_PREFERRED.to_be_bytes());
    data[10..14].copy_from_slice(&BLOCK_SIZE_MAX.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &data);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the
/// client negotiated NO_ZEROES, 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, info: ExportInfo, client: ClientFlags) {
    out.extend_from_slice(&info.size.to_be_bytes());
    out.extend_from_slice(&transmission_flags(info.read_only).to_be_bytes());
    if !client.no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES_BYTES]);
    }
}

/// What the handshake does after an option has been answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiation<E> {
    /// Wait for the next option.
    Continue,
    /// The client aborted: send the reply and close.
    Abort,
    /// Send the reply, then enter the transmission phase on this export.
    Transmission(E, ExportInfo),
}

/// Decides the answer to one option and appends it to `out`.
///
/// `lookup` resolves an export name (the empty name included) and is called at most once;
/// `names` lists the exports for `NBD_OPT_LIST`. An `Err` means the connection must close
/// without a reply: EXPORT_NAME cannot report errors, so an unknown export or a malformed name
/// there ends the session as the specification requires. Every other problem is answered
/// with an option error (`NBD_REP_ERR_INVALID`, `NBD_REP_ERR_UNKNOWN`, `NBD_REP_ERR_UNSUP`)
/// and negotiation goes on.
///
/// INFO and GO always carry `NBD_INFO_BLOCK_SIZE`, requested or not: the maximum block size
/// differs from the protocol default (unlimited), and the specification says a server with
/// non-default constraints SHOULD advertise them (and MUST when asked).
pub fn handle_option<E>(
    option: u32,
    payload: &[u8],
    client: ClientFlags,
    lookup: impl FnOnce(&str) -> Option<(E, ExportInfo)>,
    names: impl FnOnce() -> Vec<String>,
    out: &mut Vec<u8>,
) -> Result<Negotiation<E>, ProtoError> {
    let parsed = match parse_option(option, payload) {
        Ok(parsed) => parsed,
        Err(e) if option == NBD_OPT_EXPORT_NAME => return Err(e),
        Err(e) => {
            encode_option_error(out, option, NBD_REP_ERR_INVALID, &e.to_string());
            return Ok(Negotiation::Continue);
        }
    };
    match parsed {
        ClientOption::ExportName(name) => match lookup(&name) {
            Some((export, info)) => {
                encode_export_name_reply(out, info, client);
                Ok(Negotiation::Transmission(export, info))
            }
            None => Err(ProtoError::UnknownExport(name)),
        },
        ClientOption::Abort => {
            encode_option_reply(out, option, NBD_REP_ACK, &[]);
            Ok(Negotiation::Abort)
        }
        ClientOption::List => {
            for name in names() {
                // A name the protocol cannot carry is not offered.
                if name.len() <= EXPORT_NAME_BYTES_MAX && !name.contains('\0') {
                    encode_rep_server(out, &name);
                }
            }
            encode_option_reply(out, option, NBD_REP_ACK, &[]);
            Ok(Negotiation::Continue)
        }
        ClientOption::Info(request) | ClientOption::Go(request) => match lookup(&request.name) {
            Some((export, info)) => {
                encode_info_export(out, option, info);
                encode_info_block_size(out, option);
                encode_option_reply(out, option, NBD_REP_ACK, &[]);
                if option == NBD_OPT_GO {
                    Ok(Negotiation::Transmission(export, info))
                } else {
                    Ok(Negotiation::Continue)
                }
            }
            None => {
                let message = format!("no export named {:?}", request.name);
                encode_option_error(out, option, NBD_REP_ERR_UNKNOWN, &message);
                Ok(Negotiation::Continue)
            }
        },
        ClientOption::StructuredReply => {
            encode_option_error(
                out,
                option,
                NBD_REP_ERR_UNSUP,
                "structured replies are not supported",
            );
            Ok(Negotiation::Continue)
        }
        ClientOption::Unknown(number) => {
            let message = format!("option {number} is not supported");
            encode_option_error(out, option, NBD_REP_ERR_UNSUP, &message);
            Ok(Negotiation::Continue)
        }
    }
}

/// What a refused connection does after one of its options has been answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wait for the next option.
    Continue,
    /// Send what was appended (possibly nothing) and close.
    Close,
}

/// Answers one option of a connection the server will not serve (it has too many): the
/// client learns why instead of seeing the connection drop. Every option that can carry an
/// error gets `NBD_REP_ERR_POLICY` with `message`; ABORT is acknowledged and closes;
/// EXPORT_NAME, whose reply cannot carry an error, closes without one; GO, the client's last
/// step, closes after its error. The option's payload does not matter and is not looked at.
pub fn refuse_option(option: u32, message: &str, out: &mut Vec<u8>) -> Refusal {
    match option {
        NBD_OPT_ABORT => {
            encode_option_reply(out, option, NBD_REP_ACK, &[]);
            Refusal::Close
        }
        NBD_OPT_EXPORT_NAME => Refusal::Close,
        NBD_OPT_GO => {
            encode_option_error(out, option, NBD_REP_ERR_POLICY, message);
            Refusal::Close
        }
        _ => {
            encode_option_error(out, option, NBD_REP_ERR_POLICY, message);
            Refusal::Continue
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission.

/// The command of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// Any other type (CACHE, BLOCK_STATUS, RESIZE, unknown); answered with EINVAL.
    Other(u16),
}

impl Command {
    pub fn from_wire(value: u16) -> Command {
        match value {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::Other(other) => other,
        }
    }
}

/// A transmission request header. For a WRITE, `length` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & NBD_CMD_FLAG_FUA != 0
    }
}

/// Parses a request header. A bad magic is an error that ends the connection: the stream can
/// no longer be framed.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ProtoError> {
    let mut r = Reader::new(bytes, "request header");
    let magic = r.u32()?;
    let flags = r.u16()?;
    let command = Command::from_wire(r.u16()?);
    let handle = r.u64()?;
    let offset = r.u64()?;
    let length = r.u32()?;
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags,
        command,
        handle,
        offset,
        length,
    })
}

/// Encodes a request header (for tests and tools; the server only parses them).
pub fn encode_request(request: &Request) -> [u8; REQUEST_HEADER_BYTES] {
    let mut out = [0u8; REQUEST_HEADER_BYTES];
    out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_wire().to_be_bytes());
    out[8..16].copy_from_slice(&request.handle.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.length.to_be_bytes());
    out
}

/// Decides whether a request may go to the export. Checks, in this order: the command is
/// one this server serves; its flags are documented for it (FUA on any command, NO_HOLE on
/// WRITE_ZEROES); a write-like command on a read-only export; a READ/WRITE no longer than
/// `request_bytes_max`; the range within `size`. TRIM and WRITE_ZEROES carry no payload and
/// may be longer than the maximum block size (the server splits them).
pub fn check_request(
    request: &Request,
    size: u64,
    read_only: bool,
    request_bytes_max: u32,
) -> Result<(), RequestError> {
    let command = request.command;
    let allowed_flags = match command {
        Command::Read | Command::Write | Command::Flush | Command::Trim | Command::Disc => {
            NBD_CMD_FLAG_FUA
        }
        Command::WriteZeroes => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        Command::Other(other) => return Err(RequestError::UnsupportedCommand(other)),
    };
    if request.flags & !allowed_flags != 0 {
        return Err(RequestError::BadFlags {
            command: command.to_wire(),
            flags: request.flags,
        });
    }
    let write_like = matches!(
        command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if write_like && read_only {
        return Err(RequestError::ReadOnly);
    }
    let bounded = matches!(
        command,
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
    );
    if !bounded {
        return Ok(());
    }
    if matches!(command, Command::Read | Command::Write) && request.length > request_bytes_max {
        return Err(RequestError::TooLarge {
            length: request.length,
            max: request_bytes_max,
        });
    }
    let (offset, length) = (request.offset, request.length);
    let past_end = offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size);
    if past_end {
        return Err(match command {
            Command::Write | Command::WriteZeroes => RequestError::WritePastEnd {
                offset,
                length,
                size,
            },
            _ => RequestError::PastEnd {
                offset,
                length,
                size,
            },
        });
    }
    Ok(())
}

/// Splits `[offset, offset+length)` into consecutive pieces of at most `piece_max` bytes.
pub fn split_range(offset: u64, length: u32, piece_max: u32) -> impl Iterator<Item = (u64, u32)> {
    let piece_max = piece_max.max(1);
    let mut at = 0u32;
    std::iter::from_fn(move || {
        if at >= length {
            return None;
        }
        let piece = (length - at).min(piece_max);
        let item = (offset.saturating_add(u64::from(at)), piece);
        at += piece;
        Some(item)
    })
}

/// Encodes a simple reply header; for a successful READ the data follows it.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn option_bytes(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = NBD_IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// Splits a stream of option replies into (option, type, data).
    fn option_replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut r = Reader::new(bytes, "reply");
            assert_eq!(r.u64().unwrap(), NBD_REP_MAGIC);
            let option = r.u32().unwrap();
            let reply_type = r.u32().unwrap();
            let len = r.u32().unwrap() as usize;
            let data = r.take(len).unwrap().to_vec();
            bytes = &bytes[OPTION_REPLY_HEADER_BYTES + len..];
            out.push((option, reply_type, data));
        }
        out
    }

    #[test]
    fn client_flags_cases() {
        let cases: &[(&[u8], Result<ClientFlags, ProtoError>)] = &[
            (
                &[0, 0, 0, 0],
                Ok(ClientFlags {
                    fixed_newstyle: false,
                    no_zeroes: false,
                }),
            ),
            (
                &[0, 0, 0, 1],
                Ok(ClientFlags {
                    fixed_newstyle: true,
                    no_zeroes: false,
                }),
            ),
            (
                &[0, 0, 0, 3],
                Ok(ClientFlags {
                    fixed_newstyle: true,
                    no_zeroes: true,
                }),
            ),
            (&[0, 0, 0, 4], Err(ProtoError::UnknownClientFlags(4))),
            (
                &[0x80, 0, 0, 1],
                Err(ProtoError::UnknownClientFlags(0x8000_0001)),
            ),
            (
                &[0, 0, 1],
                Err(ProtoError::Truncated {
                    what: "client flags",
                    needed: 4,
                    got: 3,
                }),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(&parse_client_flags(bytes), want, "input {bytes:?}");
        }
    }

    #[test]
    fn greeting_bytes() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(out.len(), GREETING_BYTES);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
    }

    #[test]
    fn option_header_cases() {
        let ok = option_bytes(NBD_OPT_GO, &[]);
        assert_eq!(
            parse_option_header(&ok),
            Ok(OptionHeader {
                option: NBD_OPT_GO,
                length: 0
            })
        );

        let mut bad_magic = ok.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            parse_option_header(&bad_magic),
            Err(ProtoError::BadMagic { what: "option", .. })
        ));

        let mut huge = ok.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option_header(&huge),
            Err(ProtoError::OptionTooLong {
                option: NBD_OPT_GO,
                length: u32::MAX,
                max: OPTION_PAYLOAD_BYTES_MAX
            })
        );

        let mut at_limit = ok.clone();
        at_limit[12..16].copy_from_slice(&OPTION_PAYLOAD_BYTES_MAX.to_be_bytes());
        assert!(parse_option_header(&at_limit).is_ok());

        assert!(matches!(
            parse_option_header(&ok[..15]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn option_payload_cases() {
        let long_name = "n".repeat(EXPORT_NAME_BYTES_MAX + 1);
        let max_name = "n".repeat(EXPORT_NAME_BYTES_MAX);
        let cases: Vec<(u32, Vec<u8>, Result<ClientOption, ProtoError>)> = vec![
            (
                NBD_OPT_EXPORT_NAME,
                b"disk".to_vec(),
                Ok(ClientOption::ExportName("disk".into())),
            ),
            (
                NBD_OPT_EXPORT_NAME,
                vec![],
                Ok(ClientOption::ExportName(String::new())),
            ),
            (
                NBD_OPT_EXPORT_NAME,
                max_name.clone().into_bytes(),
                Ok(ClientOption::ExportName(max_name.clone())),
            ),
            (
                NBD_OPT_EXPORT_NAME,
                long_name.clone().into_bytes(),
                Err(ProtoError::NameTooLong {
                    length: EXPORT_NAME_BYTES_MAX + 1,
                    max: EXPORT_NAME_BYTES_MAX,
                }),
            ),
            (
                NBD_OPT_EXPORT_NAME,
                vec![0xff, 0xfe],
                Err(ProtoError::NameNotUtf8),
            ),
            (
                NBD_OPT_EXPORT_NAME,
                b"a\0b".to_vec(),
                Err(ProtoError::NameContainsNul),
            ),
            (NBD_OPT_ABORT, vec![], Ok(ClientOption::Abort)),
            (NBD_OPT_ABORT, vec![1, 2, 3], Ok(ClientOption::Abort)),
            (NBD_OPT_LIST, vec![], Ok(ClientOption::List)),
            (
                NBD_OPT_LIST,
                vec![1],
                Err(ProtoError::UnexpectedData {
                    option: NBD_OPT_LIST,
                    length: 1,
                }),
            ),
            (
                NBD_OPT_GO,
                info_payload("disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME]),
                Ok(ClientOption::Go(InfoRequest {
                    name: "disk".into(),
                    info_requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME],
                })),
            ),
            (
                NBD_OPT_INFO,
                info_payload("", &[]),
                Ok(ClientOption::Info(InfoRequest {
                    name: String::new(),
                    info_requests: vec![],
                })),
            ),
            (
                NBD_OPT_GO,
                {
                    let mut p = info_payload("disk", &[3]);
                    p.push(0);
                    p
                },
                Err(ProtoError::LengthMismatch {
                    expected: 12,
                    actual: 13,
                }),
            ),
            (
                NBD_OPT_GO,
                info_payload("disk", &[3])[..9].to_vec(),
                Err(ProtoError::Truncated {
                    what: "INFO/GO payload",
                    needed: 2,
                    got: 1,
                }),
            ),
            (
                NBD_OPT_GO,
                // Name length claims more than the payload holds.
                vec![0, 0, 0, 9, b'a'],
                Err(ProtoError::Truncated {
                    what: "INFO/GO payload",
                    needed: 9,
                    got: 1,
                }),
            ),
            (
                NBD_OPT_INFO,
                vec![0xff, 0xff, 0xff, 0xff],
                Err(ProtoError::NameTooLong {
                    length: u32::MAX as usize,
                    max: EXPORT_NAME_BYTES_MAX,
                }),
            ),
            (
                NBD_OPT_STRUCTURED_REPLY,
                vec![],
                Ok(ClientOption::StructuredReply),
            ),
            (
                NBD_OPT_STARTTLS,
                vec![],
                Ok(ClientOption::Unknown(NBD_OPT_STARTTLS)),
            ),
            (
                NBD_OPT_SET_META_CONTEXT,
                vec![1, 2],
                Ok(ClientOption::Unknown(NBD_OPT_SET_META_CONTEXT)),
            ),
            (0xdead_beef, vec![], Ok(ClientOption::Unknown(0xdead_beef))),
        ];
        for (option, payload, want) in cases {
            assert_eq!(
                parse_option(option, &payload),
                want,
                "option {option} payload {payload:?}"
            );
        }
    }

    fn one_export(name: &str) -> Option<((), ExportInfo)> {
        (name == "disk" || name.is_empty()).then_some((
            (),
            ExportInfo {
                size: 1 << 20,
                read_only: false,
            },
        ))
    }

    fn names() -> Vec<String> {
        vec!["disk".into(), "x".repeat(EXPORT_NAME_BYTES_MAX + 1)]
    }

    #[test]
    fn handle_option_list_info_go() {
        let client = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        let mut out = Vec::new();

        assert_eq!(
            handle_option(NBD_OPT_LIST, &[], client, one_export, names, &mut out),
            Ok(Negotiation::Continue)
        );
        let replies = option_replies(&out);
        // The over-long name is not offered.
        assert_eq!(replies.len(), 2);
        assert_eq!(
            replies[0],
            (
                NBD_OPT_LIST,
                NBD_REP_SERVER,
                [&4u32.to_be_bytes()[..], b"disk"].concat()
            )
        );
        assert_eq!(replies[1], (NBD_OPT_LIST, NBD_REP_ACK, vec![]));

        for (option, want) in [
            (NBD_OPT_INFO, Negotiation::Continue),
            (
                NBD_OPT_GO,
                Negotiation::Transmission(
                    (),
                    ExportInfo {
                        size: 1 << 20,
                        read_only: false,
                    },
                ),
            ),
        ] {
            out.clear();
            let payload = info_payload("disk", &[]);
            assert_eq!(
                handle_option(option, &payload, client, one_export, names, &mut out),
                Ok(want)
            );
            let replies = option_replies(&out);
            assert_eq!(replies.len(), 3);
            let mut export = NBD_INFO_EXPORT.to_be_bytes().to_vec();
            export.extend_from_slice(&(1u64 << 20).to_be_bytes());
            export.extend_from_slice(&transmission_flags(false).to_be_bytes());
            assert_eq!(replies[0], (option, NBD_REP_INFO, export));
            let mut block = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            block.extend_from_slice(&1u32.to_be_bytes());
            block.extend_from_slice(&4096u32.to_be_bytes());
            block.extend_from_slice(&NBD_REQUEST_BYTES_MAX.to_be_bytes());
            assert_eq!(replies[1], (option, NBD_REP_INFO, block));
            assert_eq!(replies[2], (option, NBD_REP_ACK, vec![]));
        }
    }

    #[test]
    fn handle_option_errors_keep_negotiating() {
        let client = ClientFlags::default();
        let cases: Vec<(u32, Vec<u8>, u32)> = vec![
            (NBD_OPT_GO, info_payload("nope", &[]), NBD_REP_ERR_UNKNOWN),
            (NBD_OPT_INFO, info_payload("nope", &[]), NBD_REP_ERR_UNKNOWN),
            (NBD_OPT_GO, vec![0, 0], NBD_REP_ERR_INVALID),
            (NBD_OPT_LIST, vec![0], NBD_REP_ERR_INVALID),
            (NBD_OPT_STRUCTURED_REPLY, vec![], NBD_REP_ERR_UNSUP),
            (NBD_OPT_STARTTLS, vec![], NBD_REP_ERR_UNSUP),
            (NBD_OPT_LIST_META_CONTEXT, vec![0; 8], NBD_REP_ERR_UNSUP),
            (77, vec![], NBD_REP_ERR_UNSUP),
        ];
        for (option, payload, want) in cases {
            let mut out = Vec::new();
            let got = handle_option(option, &payload, client, one_export, names, &mut out);
            assert_eq!(got, Ok(Negotiation::Continue), "option {option}");
            let replies = option_replies(&out);
            assert_eq!(replies.len(), 1, "option {option}");
            assert_eq!(
                (replies[0].0, replies[0].1),
                (option, want),
                "option {option}"
            );
        }
    }

    #[test]
    fn handle_option_export_name_and_abort() {
        let info = ExportInfo {
            size: 1 << 20,
            read_only: true,
        };
        let lookup = |name: &str| (name == "ro").then_some(((), info));

        let mut out = Vec::new();
        let got = handle_option(
            NBD_OPT_EXPORT_NAME,
            b"ro",
            ClientFlags::default(),
            lookup,
            Vec::new,
            &mut out,
        );
        assert_eq!(got, Ok(Negotiation::Transmission((), info)));
        assert_eq!(out.len(), 8 + 2 + EXPORT_NAME_REPLY_ZEROES_BYTES);
        assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
        assert_eq!(&out[8..10], &transmission_flags(true).to_be_bytes());
        assert!(out[10..].iter().all(|&b| b == 0));

        out.clear();
        let no_zeroes = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        handle_option(
            NBD_OPT_EXPORT_NAME,
            b"ro",
            no_zeroes,
            lookup,
            Vec::new,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.len(), 10);

        out.clear();
        let got = handle_option(
            NBD_OPT_EXPORT_NAME,
            b"nope",
            no_zeroes,
            lookup,
            Vec::new,
            &mut out,
        );
        assert_eq!(got, Err(ProtoError::UnknownExport("nope".into())));
        assert!(out.is_empty());

        let got = handle_option(
            NBD_OPT_EXPORT_NAME,
            &[0xff],
            no_zeroes,
            lookup,
            Vec::new,
            &mut out,
        );
        assert_eq!(got, Err(ProtoError::NameNotUtf8));

        let got = handle_option(NBD_OPT_ABORT, &[], no_zeroes, lookup, Vec::new, &mut out);
        assert_eq!(got, Ok(Negotiation::Abort));
        assert_eq!(
            option_replies(&out),
            vec![(NBD_OPT_ABORT, NBD_REP_ACK, vec![])]
        );
    }

    #[test]
    fn refused_options_carry_the_reason() {
        let reason = "too many connections";
        for option in [
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_INFO,
            NBD_OPT_LIST,
            NBD_OPT_SET_META_CONTEXT,
            77,
        ] {
            let mut out = Vec::new();
            assert_eq!(
                refuse_option(option, reason, &mut out),
                Refusal::Continue,
                "option {option}"
            );
            assert_eq!(
                option_replies(&out),
                vec![(option, NBD_REP_ERR_POLICY, reason.as_bytes().to_vec())]
            );
        }
        let mut out = Vec::new();
        assert_eq!(refuse_option(NBD_OPT_GO, reason, &mut out), Refusal::Close);
        assert_eq!(
            option_replies(&out),
            vec![(NBD_OPT_GO, NBD_REP_ERR_POLICY, reason.as_bytes().to_vec())]
        );
        out.clear();
        assert_eq!(
            refuse_option(NBD_OPT_ABORT, reason, &mut out),
            Refusal::Close
        );
        assert_eq!(
            option_replies(&out),
            vec![(NBD_OPT_ABORT, NBD_REP_ACK, vec![])]
        );
        out.clear();
        assert_eq!(
            refuse_option(NBD_OPT_EXPORT_NAME, reason, &mut out),
            Refusal::Close
        );
        assert!(out.is_empty(), "EXPORT_NAME cannot carry an error");
    }

    #[test]
    fn transmission_flag_values() {
        assert_eq!(transmission_flags(false), 0b1_0110_1101);
        assert_eq!(transmission_flags(true), 0b1_0110_1111);
    }

    #[test]
    fn request_parse_cases() {
        let request = Request {
            flags: NBD_CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let bytes = encode_request(&request);
        assert_eq!(
            bytes,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(parse_request(&bytes), Ok(request));

        let mut bad = bytes;
        bad[3] = 0x14;
        assert_eq!(
            parse_request(&bad),
            Err(ProtoError::BadMagic {
                what: "request",
                found: 0x2560_9514
            })
        );
        assert_eq!(
            parse_request(&bytes[..27]),
            Err(ProtoError::Truncated {
                what: "request header",
                needed: 4,
                got: 3
            })
        );
        for (wire, command) in [
            (0, Command::Read),
            (1, Command::Write),
            (2, Command::Disc),
            (3, Command::Flush),
            (4, Command::Trim),
            (5, Command::Other(5)),
            (6, Command::WriteZeroes),
            (7, Command::Other(7)),
            (0xffff, Command::Other(0xffff)),
        ] {
            assert_eq!(Command::from_wire(wire), command);
            assert_eq!(command.to_wire(), wire);
        }
    }

    #[test]
    fn check_request_cases() {
        const SIZE: u64 = 1 << 20;
        const MAX: u32 = 1 << 16;
        let req = |command: Command, flags: u16, offset: u64, length: u32| Request {
            flags,
            command,
            handle: 7,
            offset,
            length,
        };
        use Command::*;
        // (request, read_only, expected errno or 0)
        let cases: Vec<(Request, bool, u32)> = vec![
            (req(Read, 0, 0, 4096), false, 0),
            (req(Read, 0, SIZE - 1, 1), false, 0),
            (req(Read, 0, SIZE - 1, 2), false, NBD_EINVAL),
            (req(Read, 0, SIZE, 0), false, 0),
            (req(Read, 0, SIZE + 1, 0), false, NBD_EINVAL),
            (req(Read, 0, u64::MAX, 1), false, NBD_EINVAL),
            (req(Read, 0, 0, MAX), false, 0),
            (req(Read, 0, 0, MAX + 1), false, NBD_EINVAL),
            (req(Read, NBD_CMD_FLAG_FUA, 0, 1), true, 0),
            (req(Read, NBD_CMD_FLAG_DF, 0, 1), false, NBD_EINVAL),
            (req(Write, NBD_CMD_FLAG_FUA, 0, 4096), false, 0),
            (req(Write, 0, SIZE - 1, 2), false, NBD_ENOSPC),
            (req(Write, 0, u64::MAX - 1, 4), false, NBD_ENOSPC),
            (req(Write, 0, 0, MAX + 1), false, NBD_EINVAL),
            (req(Write, 0, 0, 1), true, NBD_EPERM),
            (req(Write, NBD_CMD_FLAG_NO_HOLE, 0, 1), false, NBD_EINVAL),
            (req(Flush, 0, 0, 0), false, 0),
            (req(Flush, NBD_CMD_FLAG_FUA, 0, 0), true, 0),
            (req(Trim, 0, 0, 4096), false, 0),
            (req(Trim, 0, 0, u32::MAX), false, NBD_EINVAL),
            (req(Trim, 0, SIZE - 4096, 8192), false, NBD_EINVAL),
            (req(Trim, 0, 0, 4096), true, NBD_EPERM),
            (
                req(
                    WriteZeroes,
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA,
                    0,
                    4096,
                ),
                false,
                0,
            ),
            (req(WriteZeroes, 0, 0, SIZE as u32), false, 0),
            (req(WriteZeroes, 0, 1, SIZE as u32), false, NBD_ENOSPC),
            (
                req(WriteZeroes, NBD_CMD_FLAG_FAST_ZERO, 0, 1),
                false,
                NBD_EINVAL,
            ),
            (req(WriteZeroes, 0, 0, 1), true, NBD_EPERM),
            (req(Other(NBD_CMD_CACHE), 0, 0, 1), false, NBD_EINVAL),
            (req(Other(NBD_CMD_BLOCK_STATUS), 0, 0, 1), false, NBD_EINVAL),
            (req(Other(99), 0, 0, 0), false, NBD_EINVAL),
        ];
        for (request, read_only, want) in cases {
            let got = check_request(&request, SIZE, read_only, MAX)
                .map_or_else(|e| e.nbd_errno(), |()| 0);
            assert_eq!(got, want, "{request:?} read_only={read_only}");
        }
    }

    #[test]
    fn split_range_cases() {
        let pieces: Vec<_> = split_range(10, 25, 10).collect();
        assert_eq!(pieces, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(split_range(0, 0, 10).count(), 0);
        assert_eq!(
            split_range(0, u32::MAX, NBD_REQUEST_BYTES_MAX)
                .map(|(_, l)| u64::from(l))
                .sum::<u64>(),
            u64::from(u32::MAX)
        );
        assert_eq!(split_range(5, 3, 0).count(), 3);
    }

    #[test]
    fn simple_reply_bytes() {
        assert_eq!(
            encode_simple_reply(0x0a0b, NBD_EINVAL),
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0x0a, 0x0b
            ]
        );
    }

    #[test]
    fn option_error_message_is_bounded() {
        let mut out = Vec::new();
        encode_option_error(&mut out, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, &"é".repeat(5000));
        let replies = option_replies(&out);
        assert!(replies[0].2.len() <= EXPORT_NAME_BYTES_MAX);
        assert!(std::str::from_utf8(&replies[0].2).is_ok());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256), option in any::<u32>()) {
            let _ = parse_client_flags(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option(option, &bytes);
            let _ = parse_request(&bytes);
            let mut out = Vec::new();
            let _ = handle_option(option, &bytes, ClientFlags::default(), one_export, names, &mut out);
            if let Ok(request) = parse_request(&bytes) {
                let _ = check_request(&request, 1 << 20, false, 1 << 16);
            }
        }

        #[test]
        fn info_payloads_never_panic(name_len in any::<u32>(), rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut payload = name_len.to_be_bytes().to_vec();
            payload.extend_from_slice(&rest);
            let _ = parse_option(NBD_OPT_GO, &payload);
            let _ = parse_option(NBD_OPT_INFO, &payload);
        }

        #[test]
        fn requests_round_trip(flags in any::<u16>(), command in any::<u16>(), handle in any::<u64>(), offset in any::<u64>(), length in any::<u32>()) {
            let request = Request { flags, command: Command::from_wire(command), handle, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&request)), Ok(request));
        }

        #[test]
        fn split_range_covers_exactly(offset in 0u64..1 << 40, length in any::<u32>(), piece_max in 1u32..=u32::MAX) {
            let mut at = offset;
            for (o, l) in split_range(offset, length, piece_max) {
                prop_assert_eq!(o, at);
                prop_assert!(l > 0 && l <= piece_max);
                at += u64::from(l);
            }
            prop_assert_eq!(at, offset + u64::from(length));
        }
    }
}
