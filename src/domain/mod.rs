//! The domain model: types that parse, so a value that exists is valid.
//! Nothing here talks to Kafka, PostgreSQL or the network.

pub mod amount;
pub mod buffer;
pub mod conversion;
pub mod currency;
pub mod event;
pub mod job;
pub mod posting;

pub use amount::{Amount, AmountError, Money, UsdAmount, UsdcAmount};
pub use buffer::{
    BufferAccount, BufferStatus, InvalidThresholds, Thresholds, UnknownBufferAccount,
    UnknownBufferStatus,
};
pub use conversion::{ConversionCommand, ConversionDirection, ConversionTrigger};
pub use currency::{Currency, CurrencyUnit, Usd, Usdc};
pub use event::{BufferDelta, FLOW_TABLE, FlowEffect, FlowEvent, FlowKind, flow_effect};
pub use job::{ConversionJob, IllegalTransition, JobStatus, UnknownJobStatus};
pub use posting::{EntrySide, LedgerEntry, LedgerPosting, PostingError};
