//! A reservation from its grant to its settlement or release ([`Held`]), and the streamed
//! answer that settles it when it ends ([`Tapped`]).
//!
//! One rule settles every answer that did not end as it should, in all formats: a stream
//! cut short (the client went away, the provider's connection failed or hit the deadline), or
//! one that ended in the provider's own error event (Anthropic's `event: error` after
//! `message_start`, an `error` object in an OpenAI or Gemini stream), or a Gemini JSON array
//! that never closed, is charged what it reported or its reservation, whichever is larger:
//! the provider may have spent more than it said before it failed, and never less than it
//! said.

use super::RequestPath;
use crate::domain::{CredentialId, ProviderName, ReservationId};
use crate::providers::tap::StreamTap;
use crate::providers::wire::Usage;
use crate::store::{Mark, StoreError};
use crate::upstream::AnswerStream;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A reservation between its grant and its settlement or release. Dropped while still held
/// (the exchange panicked, or its task was torn down), it is released without a mark, so a
/// fault in the request path never leaves tokens reserved until the next start.
pub(super) struct Held {
    path: RequestPath,
    reservation: ReservationId,
    credential: CredentialId,
    provider: ProviderName,
    done: bool,
}

impl Held {
    pub(super) fn new(
        path: &RequestPath,
        reservation: ReservationId,
        credential: CredentialId,
        provider: &ProviderName,
    ) -> Held {
        Held {
            path: path.clone(),
            reservation,
            credential,
            provider: provider.clone(),
            done: false,
        }
    }

    /// The credential the reservation is on.
    pub(super) fn credential(&self) -> &CredentialId {
        &self.credential
    }

    /// Release the reservation unused, marking the credential when the failure was its own
    /// (`context` says how the failure was learnt, for the auth log). A failure to release is
    /// logged: the reservation then stays, and the next start charges it.
    pub(super) async fn give_back(self, mark: Option<Mark>, context: &str) {
        if let Err(e) = self.release(mark, context).await {
            tracing::error!(error = %e, "cannot release a reservation");
        }
    }

    /// Release the reservation unused, with an optional mark (`context` as for
    /// [`Held::give_back`]); `false` when it was already settled or released.
    pub(super) async fn release(
        mut self,
        mark: Option<Mark>,
        context: &str,
    ) -> Result<bool, StoreError> {
        self.done = true;
        let (id, cred, name) = (&self.reservation, &self.credential, &self.provider);
        self.path.release(id, cred, name, mark, context).await
    }

    /// The reservation outlives the request (a lease handed out): it is settled by a report
    /// or when it expires. Its id and its credential's.
    pub(super) fn keep(mut self) -> (ReservationId, CredentialId) {
        self.done = true;
        (
            std::mem::take(&mut self.reservation),
            std::mem::take(&mut self.credential),
        )
    }

    /// Hand the reservation to what settles it once the answer is read.
    pub(super) fn settler(mut self) -> Settler {
        self.done = true;
        Settler {
            path: self.path.clone(),
            reservation: std::mem::take(&mut self.reservation),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.done {
            tracing::error!(
                reservation = %self.reservation,
                "a request ended without settling its reservation; releasing it"
            );
            let now = self.path.now();
            self.path.0.store.release_later(&self.reservation, now);
        }
    }
}

pub(super) struct Settler {
    path: RequestPath,
    reservation: ReservationId,
}

impl Settler {
    /// Queue the settlement without waiting for it (the stream's poll cannot wait, and an
    /// answer need not): the ledger commits it with its group. `complete`: the answer ended
    /// as it should; otherwise (and without usage) it is charged at least its reservation.
    pub(super) fn settle(self, usage: Option<Usage>, complete: bool) {
        let exact = complete && usage.is_some();
        self.path.0.store.settle_later(
            &self.reservation,
            usage.unwrap_or_default(),
            !exact,
            self.path.now(),
        );
    }
}

/// A streamed answer with its usage tap; settles when it ends or is dropped.
pub struct Tapped {
    inner: AnswerStream,
    tap: StreamTap,
    settler: Option<Settler>,
    done: bool,
}

impl Tapped {
    pub(super) fn new(inner: AnswerStream, tap: StreamTap, settler: Settler) -> Tapped {
        Tapped {
            inner,
            tap,
            settler: Some(settler),
            done: false,
        }
    }
}

impl Stream for Tapped {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.tap.feed(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    let usage = self.tap.usage();
                    if let Some(s) = self.settler.take() {
                        s.settle(usage, false);
                    }
                    return Poll::Ready(Some(Err(std::io::Error::other(e))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.tap.finish();
                    // An error event in the stream (or an array left open) ends it as failed,
                    // though its connection closed cleanly.
                    let (usage, complete) = (self.tap.usage(), !self.tap.failed());
                    if let Some(s) = self.settler.take() {
                        s.settle(usage, complete);
                    }
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Tapped {
    fn drop(&mut self) {
        // The client went away (or the server is stopping) before the end: charge at least
        // the reservation.
        if let Some(s) = self.settler.take() {
            s.settle(self.tap.usage(), false);
        }
    }
}
