//! Tokens a request used, as the provider (or a lease's holder) reported them: read from
//! answers by `providers`, charged to counters by `store`.

use crate::quota::RequestTokens;

/// Tokens a provider reported for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
}

impl Usage {
    /// Usage as a provider (or a lease's holder) reported it, each count clamped to
    /// [`MAX_REQUEST_TOKENS`](crate::quota::MAX_REQUEST_TOKENS): a provider's number is not refused, but cannot be believed past
    /// what one request can use.
    pub fn reported(input: u64, output: u64) -> Usage {
        Usage {
            input: RequestTokens::clamped(input).get(),
            output: RequestTokens::clamped(output).get(),
        }
    }

    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}
