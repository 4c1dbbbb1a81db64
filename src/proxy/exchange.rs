//! Forwarding one call, in its stages: [`prepare`] the body and the target, then per attempt
//! [`attempt`] a reserved credential (send the call, up to the answer's status) and, when the
//! provider failed, [`read_failure`] (classify its answer, mark and release), until an answer
//! is [`deliver`]ed (settled from the usage it reports, whole or as it streams).

use super::attempts::{Attempts, Granted, Then, after_failure};
use super::settle::{Held, Tapped};
use super::{AnswerBody, Call, Forwarded, PathError, RequestPath, TokenRenewal};
use crate::crypto::Secret;
use crate::providers::exchange::{self as format, Prepared};
use crate::providers::wire;
use crate::upstream::{Answer, Target};
use std::borrow::Cow;
use std::sync::Arc;

/// Error bodies read from upstream at most (to classify them and pass them on).
const MAX_ERROR_BODY: usize = 256 * 1024;
/// Non-streamed answers read at most.
const MAX_ANSWER_BODY: usize = 64 * 1024 * 1024;

/// Forward `call` through the attempt loop.
pub(super) async fn exchange(path: RequestPath, call: Call) -> Result<Forwarded, PathError> {
    let (prepared, target) = prepare(&path, &call)?;
    let name = &call.provider.name;
    let mut attempts = Attempts::request(&path, name, prepared.tokens);
    // The provider's error answer of the last attempt that tried another credential.
    let mut last_failure = None;
    let mut overloaded = false;
    loop {
        let granted = match attempts.next().await {
            Ok(Some(granted)) => granted,
            Ok(None) => break,
            Err(PathError::Unavailable { .. }) if last_failure.is_some() => break,
            Err(e) => return Err(e),
        };
        let Some(sent) = attempt(&path, &call, &target, &prepared, granted).await? else {
            continue;
        };
        if sent.answer.status.is_success() {
            return deliver(sent.held, sent.answer, &call, prepared.hide_usage_chunk).await;
        }
        let (failure, then) = read_failure(&path, &call, sent, &mut overloaded).await;
        match then {
            Then::Answer => return Ok(failure),
            Then::Refused(reason) => {
                let provider = name.clone();
                return Err(PathError::LocationRefused { provider, reason });
            }
            Then::TryAnother => last_failure = Some(failure),
            Then::TryAgain(credential) => {
                attempts.allow_again(&credential);
                last_failure = Some(failure);
            }
        }
    }
    last_failure.ok_or_else(|| PathError::NoneSucceeded(name.clone()))
}

/// The call's body made ready for its provider, and where it goes.
fn prepare<'c>(
    path: &RequestPath,
    call: &'c Call,
) -> Result<(Prepared, Cow<'c, Target>), PathError> {
    if !call.provider.enabled {
        return Err(PathError::ProviderDisabled(call.provider.name.clone()));
    }
    let default = path.0.settings.default_reservation;
    let prepared = format::prepare(&call.provider, &call.peek, &call.raw, call.stream, default)?;
    let target = call
        .provider
        .target(&call.path)
        .ok_or(PathError::InvalidPath)?;
    Ok((prepared, target))
}

/// A call sent with a reserved credential: its answer (any status), the reservation still held,
/// and the token it was sent with.
struct Sent {
    held: Held,
    answer: Answer,
    token: Arc<Secret>,
}

/// Send the call with a reserved credential, up to the answer's status and headers: the
/// answer (any status) with the reservation still held and the token sent, or `None` when the
/// credential cannot be sent (marked invalid, reservation released: the next one is tried).
async fn attempt(
    path: &RequestPath,
    call: &Call,
    target: &Target,
    prepared: &Prepared,
    granted: Granted,
) -> Result<Option<Sent>, PathError> {
    let Granted { held, token } = granted;
    let mut headers =
        match format::headers(call.provider.format, &call.pass_headers, token.expose()) {
            Ok(headers) => headers,
            Err(reason) => {
                held.give_back(Some(crate::store::Mark::Invalid(reason)), "")
                    .await;
                return Ok(None);
            }
        };
    let own_target;
    let mut target = target;
    if let Some(copilot) = &call.provider.copilot {
        copilot.add_headers(&mut headers, prepared.vision);
        // The API base the credential's token answer named, unless the config names one.
        if call.provider.follows_api_base()
            && let Some(base) = path.0.store.api_base(held.credential())
            && let Some(t) = call.provider.target_under(&base, &call.path)
        {
            own_target = t;
            target = &own_target;
        }
    }
    match path
        .0
        .upstream
        .post(target, headers, prepared.body.clone())
        .await
    {
        Ok(answer) => Ok(Some(Sent {
            held,
            answer,
            token,
        })),
        Err(e) => {
            // Nothing reached the provider, or nothing came back by the deadline: the
            // provider's state, not the key's. Its other keys go to the same host, so
            // trying them would only make the client wait as long again.
            let provider = call.provider.name.clone();
            tracing::warn!(%provider, error = %e, "upstream request failed");
            held.give_back(None, "").await;
            Err(PathError::Unreachable {
                provider,
                cause: e.cause(),
            })
        }
    }
}

/// Read a failed answer, release its reservation with the mark its verdict gives, and say what
/// follows; the answer is kept to pass on as it came. A 401 that rejects an OAuth credential's
/// token refreshes the credential first ([`RequestPath::renew_rejected`]): refreshed, it is not
/// marked, and the request goes on to the next credential as it would have.
async fn read_failure(
    path: &RequestPath,
    call: &Call,
    sent: Sent,
    overloaded: &mut bool,
) -> (Forwarded, Then) {
    let Sent {
        held,
        mut answer,
        token,
    } = sent;
    let status = answer.status;
    let headers = std::mem::take(&mut answer.headers);
    let body = answer
        .read_limited(MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let format = call.provider.format;
    let verdict = (path.0.classify)(format, status, &headers, &body, path.now());
    let (mut mark, mut then) = after_failure(&verdict, overloaded, path.now());
    let (name, rejected) = (&call.provider.name, crate::refresh::Rejected::Token(&token));
    let renewal = path.renew_rejected(status, &verdict, held.credential(), name, rejected);
    match renewal.await {
        TokenRenewal::Renewed => {
            mark = None;
            then = Then::TryAgain(held.credential().clone());
        }
        TokenRenewal::Unmarked => mark = None,
        TokenRenewal::Not => {}
    }
    held.give_back(mark, "").await;
    let failure = Forwarded {
        status,
        headers: format::answer_headers(&headers),
        body: AnswerBody::Whole(body),
    };
    (failure, then)
}

/// Pass a successful answer on, settling the reservation from the usage it reports: read
/// whole when not streamed, else tapped as it streams.
async fn deliver(
    held: Held,
    answer: Answer,
    call: &Call,
    hide_usage_chunk: bool,
) -> Result<Forwarded, PathError> {
    let format = call.provider.format;
    let status = answer.status;
    let headers = format::answer_headers(&answer.headers);
    if call.stream {
        let tap = format::stream_tap(format, &call.path, hide_usage_chunk);
        let tapped = Tapped::new(answer.into_stream(), tap, held.settler());
        let body = AnswerBody::Stream(tapped);
        return Ok(Forwarded {
            status,
            headers,
            body,
        });
    }
    let body = match answer.read_limited(MAX_ANSWER_BODY).await {
        Ok(body) => body,
        Err(e) => {
            tracing::warn!(provider = %call.provider.name, error = %e, "upstream answer cut short");
            held.settler().settle(None, false);
            return Err(PathError::CutShort);
        }
    };
    let usage = wire::usage_from_answer(format, &body);
    // The settlement may land after the answer: a crash before it leaves the reservation,
    // which the next start charges in full.
    held.settler().settle(usage, true);
    Ok(Forwarded {
        status,
        headers,
        body: AnswerBody::Whole(body),
    })
}
