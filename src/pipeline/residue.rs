//! Residue stage: `maximumcall` must not exceed the chosen caller line's
//! `residue`, read from the vendor's task-initialisation endpoint. Line lists
//! are cached per (user, sub-user) with single flight, and updates of one
//! (user, sub-user, line) are checked and forwarded one at a time, so two
//! concurrent updates are never both admitted against the same stale value.
//! An update makes only its own line's cached residue stale: the next update
//! of another line of the same user is still answered from the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::Value;
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::config::{AfterUpdate, OnUnavailable, ResidueConfig, SharedFallback, UpstreamConfig};
use crate::error::Error;
use crate::pipeline::forward;
use crate::secret::Token;
use crate::shared::{Lease, LeaseOutcome, SharedState, Unavailable};
use crate::upstream::UpstreamClient;

/// Whose line list: the account, or one of its sub-accounts.
pub type ListKey = (Uuid, Option<Uuid>);

/// Caller line id -> residue.
pub type LineList = HashMap<Uuid, i64>;

/// How the rule was applied to one update; the audit record says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Checked against this residue, read from `list`, and admitted.
    Checked { residue: i64, list: Arc<LineList> },
    /// `residue.enabled = false`.
    Disabled,
    /// The list could not be read and `on_unavailable = "allow"`.
    UnavailableAllowed,
}

/// Why a line list could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("vendor unreachable or timed out")]
    Upstream,
    #[error("vendor answered HTTP {0}")]
    Status(StatusCode),
    #[error("answer is not JSON")]
    NotJson,
    #[error("no caller_line_list in the answer")]
    NoList,
    #[error("caller line entry {0} has no usable value/residue")]
    BadEntry(usize),
}

/// How a lookup ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    Hit,
    Miss,
    Error,
}

impl LookupResult {
    /// How a shared fetch ended for one of its callers.
    fn of<T, E>(result: &Result<T, E>, fetched: bool) -> LookupResult {
        match (result, fetched) {
            (Err(_), _) => LookupResult::Error,
            (Ok(_), true) => LookupResult::Miss,
            (Ok(_), false) => LookupResult::Hit,
        }
    }

    /// The `result` label of `taskgate_residue_lookups_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            LookupResult::Hit => "hit",
            LookupResult::Miss => "miss",
            LookupResult::Error => "error",
        }
    }
}

type Cell = Arc<OnceCell<Result<Arc<LineList>, LookupError>>>;

struct CacheEntry {
    cell: Cell,
    created: Instant,
    /// Lines an update may have changed since this list was asked for (its
    /// fetch may still be running): the next check of one of them reads the
    /// list again, which replaces this entry. Few, so a Vec.
    stale: Vec<Uuid>,
}

/// Past this many cached lists, expired ones are swept on the next insert.
const CACHE_SWEEP_AT: usize = 10_000;

pub struct ResidueGate {
    cache: Mutex<HashMap<ListKey, CacheEntry>>,
    /// With `[shared]`: vendor reads in flight, so concurrent misses of one
    /// list in this process make one call (the list itself lives in Redis).
    fetching: Mutex<HashMap<ListKey, Cell>>,
    locks: Arc<Mutex<HashMap<LineKey, Arc<tokio::sync::Mutex<()>>>>>,
}

type LineKey = (Uuid, Option<Uuid>, Uuid);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; recover rather than cascade.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Held from the residue check until the vendor has answered and the cache
/// entry is dropped. Removes its lock from the table when nobody else waits.
pub struct LineGuard {
    locks: Arc<Mutex<HashMap<LineKey, Arc<tokio::sync::Mutex<()>>>>>,
    key: LineKey,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LineGuard {
    fn drop(&mut self) {
        let mut table = lock(&self.locks);
        self.held.take();
        // The table's Arc is the only one left: nobody holds or waits.
        if table
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            table.remove(&self.key);
        }
    }
}

/// A caller line held for one update: this process's lock and, with
/// `[shared]` while Redis answers, the lease every replica respects. The
/// lock goes when this is dropped; the lease only through [`ResidueGate::settle_shared`]
/// (or by running out).
pub struct LineHold {
    _local: LineGuard,
    pub lease: Option<Lease>,
    /// `[shared]` is configured but Redis did not answer: only this
    /// process's lock holds the line.
    pub degraded: bool,
}

/// An update the rule admitted: the line held until its outcome is
/// settled, how it was checked, and whether the shared state was missing.
pub struct Admitted {
    pub hold: Option<LineHold>,
    pub verdict: Verdict,
    pub degraded: bool,
}

/// What the stage needs from the rest of the gateway for a lookup.
#[derive(Clone, Copy)]
pub struct Lookup<'a> {
    pub client: &'a UpstreamClient,
    pub upstream: &'a UpstreamConfig,
    pub token: &'a Token,
    pub request_id: &'a str,
}

impl Default for ResidueGate {
    fn default() -> Self {
        ResidueGate {
            cache: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            locks: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl ResidueGate {
    /// Serialises updates of one caller line within this process.
    pub async fn lock_line(&self, key: ListKey, line: Uuid) -> LineGuard {
        let key = (key.0, key.1, line);
        let mutex = lock(&self.locks).entry(key).or_default().clone();
        let held = mutex.lock_owned().await;
        LineGuard {
            locks: self.locks.clone(),
            key,
            held: Some(held),
        }
    }

    /// The stage: holds the line (this process's lock, then the shared lease)
    /// and applies the rule against the shared cache while Redis answers, else
    /// against this process's (or refuses, per `shared.on_unavailable`).
    /// `on_wait` is told how long the line was waited for.
    #[allow(clippy::too_many_arguments)]
    pub async fn admit(
        &self,
        shared: Option<&SharedState>,
        cfg: &ResidueConfig,
        lookup: Lookup<'_>,
        (key, line, maximumcall): (ListKey, Uuid, i64),
        lease_for: std::time::Duration,
        wait: std::time::Duration,
        on_wait: impl FnOnce(std::time::Duration),
        on_lookup: impl Fn(LookupResult),
    ) -> Result<Admitted, Error> {
        if !cfg.enabled {
            // Without the rule there is no residue to keep consistent.
            return Ok(Admitted {
                hold: None,
                verdict: Verdict::Disabled,
                degraded: false,
            });
        }
        let started = Instant::now();
        let hold = self.hold_line(shared, key, line, lease_for, wait).await?;
        on_wait(started.elapsed());
        let mut hold = hold;
        let mut degraded = hold.degraded;
        let seen = hold.lease.as_mut().and_then(Lease::take_seen);
        let verdict = match shared {
            Some(shared) if hold.lease.is_some() => {
                match self
                    .check_shared(
                        shared,
                        cfg,
                        lookup,
                        key,
                        line,
                        maximumcall,
                        seen,
                        &on_lookup,
                    )
                    .await
                {
                    Ok(Ok(verdict)) => verdict,
                    // Refused: nothing will be sent, so the line goes at once.
                    Ok(Err(refusal)) => {
                        self.release_unused(Some(shared), Some(hold)).await;
                        return Err(refusal);
                    }
                    // Redis stopped answering under the lease.
                    Err(Unavailable) => match shared.fallback() {
                        SharedFallback::Reject => return Err(Error::SharedStateUnavailable),
                        SharedFallback::Local => {
                            degraded = true;
                            self.check(cfg, lookup, key, line, maximumcall, &on_lookup)
                                .await?
                        }
                    },
                }
            }
            _ => {
                self.check(cfg, lookup, key, line, maximumcall, &on_lookup)
                    .await?
            }
        };
        Ok(Admitted {
            hold: Some(hold),
            verdict,
            degraded,
        })
    }

    /// Holds the line: this process's lock first (so one process never
    /// contends with itself in Redis), then the shared lease for `hold`.
    /// Waiting for either is bounded by `wait` (then 503 `overloaded`).
    async fn hold_line(
        &self,
        shared: Option<&SharedState>,
        key: ListKey,
        line: Uuid,
        hold: std::time::Duration,
        wait: std::time::Duration,
    ) -> Result<LineHold, Error> {
        let until = tokio::time::Instant::now() + wait;
        let local = tokio::time::timeout_at(until, self.lock_line(key, line))
            .await
            .map_err(|_| Error::Overloaded)?;
        let Some(shared) = shared else {
            return Ok(LineHold {
                _local: local,
                lease: None,
                degraded: false,
            });
        };
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match shared.acquire_line((key.0, key.1, line), hold, left).await {
            Ok(LeaseOutcome::Acquired(lease)) => Ok(LineHold {
                _local: local,
                lease: Some(lease),
                degraded: false,
            }),
            Ok(LeaseOutcome::TimedOut) => Err(Error::Overloaded),
            Err(Unavailable) => match shared.fallback() {
                SharedFallback::Local => Ok(LineHold {
                    _local: local,
                    lease: None,
                    degraded: true,
                }),
                SharedFallback::Reject => Err(Error::SharedStateUnavailable),
            },
        }
    }

    /// The rule against the shared line-list cache (call with the lease
    /// held): a hit reads one field from Redis; a miss reads the vendor once
    /// per process and stores the list unless a line was invalidated since.
    /// `Err(Unavailable)`: Redis stopped answering; the caller falls back.
    #[allow(clippy::too_many_arguments)]
    async fn check_shared(
        &self,
        shared: &SharedState,
        cfg: &ResidueConfig,
        lookup: Lookup<'_>,
        key: ListKey,
        line: Uuid,
        maximumcall: i64,
        seen: Option<(Option<i64>, i64)>,
        on_lookup: impl Fn(LookupResult),
    ) -> Result<Result<Verdict, Error>, Unavailable> {
        if !cfg.enabled {
            return Ok(Ok(Verdict::Disabled));
        }
        let (cached, generation) = match seen {
            Some(seen) => seen,
            None => shared.cached_residue(key.0, key.1, line).await?,
        };
        let residue = match cached {
            Some(residue) => {
                on_lookup(LookupResult::Hit);
                residue
            }
            None => {
                let (result, fetched) = self.fetch_once(cfg, lookup, key).await;
                on_lookup(LookupResult::of(&result, fetched));
                let lines = match result {
                    Ok(lines) => lines,
                    Err(e) => {
                        tracing::warn!(cause = %e, user_id = %key.0, "caller line list unavailable");
                        return Ok(match cfg.on_unavailable {
                            OnUnavailable::Reject => Err(Error::ResidueUnavailable),
                            OnUnavailable::Allow => Ok(Verdict::UnavailableAllowed),
                        });
                    }
                };
                if fetched {
                    let pairs: Vec<(Uuid, i64)> = lines.iter().map(|(l, r)| (*l, *r)).collect();
                    shared
                        .fill_lines(key.0, key.1, &pairs, generation, cfg.cache_ttl)
                        .await?;
                }
                match lines.get(&line) {
                    Some(&residue) => residue,
                    None => {
                        return Ok(Err(Error::UnknownCallerLine {
                            line: line.to_string(),
                        }));
                    }
                }
            }
        };
        if maximumcall > residue {
            return Ok(Err(Error::ResidueExceeded {
                maximumcall,
                residue,
                line: line.to_string(),
            }));
        }
        Ok(Ok(Verdict::Checked {
            residue,
            list: Arc::new(LineList::from([(line, residue)])),
        }))
    }

    /// After the update of a line held with a lease: every replica's cached
    /// residue of that line is settled (lowered by an accepted update with
    /// `after_update = "decrement"`, else forgotten) before the lease is
    /// released. When the vendor's answer is unknown, or the settle itself
    /// failed, the lease is kept: it outlives the cached list, so the next
    /// update of the line reads the vendor again.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle_shared(
        &self,
        shared: &SharedState,
        cfg: &ResidueConfig,
        key: ListKey,
        line: Uuid,
        lease: Lease,
        accepted: bool,
        answer_known: bool,
        maximumcall: i64,
        gen_ttl: std::time::Duration,
    ) {
        self.invalidate(key, line);
        let decrement =
            (accepted && cfg.after_update == AfterUpdate::Decrement).then_some(maximumcall);
        // Settled and released in one round trip; if the settle fails the
        // lease is not released (the script does both or neither).
        let _ = shared
            .settle_line(
                key.0,
                key.1,
                line,
                decrement,
                gen_ttl,
                answer_known.then_some(lease),
            )
            .await;
    }

    /// Lets go of a line held for an update that was refused before anything
    /// was sent (the cache was not touched, so there is nothing to settle).
    pub async fn release_unused(&self, shared: Option<&SharedState>, hold: Option<LineHold>) {
        if let (Some(shared), Some(lease)) = (shared, hold.and_then(|mut h| h.lease.take())) {
            shared.release_line(lease).await;
        }
    }

    /// One vendor read per list at a time in this process (shared mode).
    async fn fetch_once(
        &self,
        cfg: &ResidueConfig,
        lookup: Lookup<'_>,
        key: ListKey,
    ) -> (Result<Arc<LineList>, LookupError>, bool) {
        let cell = lock(&self.fetching).entry(key).or_default().clone();
        let (result, fetched) = fill(&cell, cfg, lookup, key).await;
        let mut fetching = lock(&self.fetching);
        if fetching.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            fetching.remove(&key);
        }
        (result, fetched)
    }

    /// Applies the rule to one update. Call with the line's guard held.
    pub async fn check(
        &self,
        cfg: &ResidueConfig,
        lookup: Lookup<'_>,
        key: ListKey,
        line: Uuid,
        maximumcall: i64,
        on_lookup: impl FnOnce(LookupResult),
    ) -> Result<Verdict, Error> {
        if !cfg.enabled {
            return Ok(Verdict::Disabled);
        }
        let lines = match self.lines(cfg, lookup, key, line, on_lookup).await {
            Ok(lines) => lines,
            Err(e) => {
                tracing::warn!(cause = %e, user_id = %key.0, "caller line list unavailable");
                return match cfg.on_unavailable {
                    OnUnavailable::Reject => Err(Error::ResidueUnavailable),
                    OnUnavailable::Allow => Ok(Verdict::UnavailableAllowed),
                };
            }
        };
        let Some(&residue) = lines.get(&line) else {
            return Err(Error::UnknownCallerLine {
                line: line.to_string(),
            });
        };
        if maximumcall > residue {
            return Err(Error::ResidueExceeded {
                maximumcall,
                residue,
                line: line.to_string(),
            });
        }
        Ok(Verdict::Checked {
            residue,
            list: lines,
        })
    }

    /// After an update of `line` the vendor may have applied: the next check
    /// of that line reads the list again; the other lines' values stay.
    pub fn invalidate(&self, key: ListKey, line: Uuid) {
        if let Some(entry) = lock(&self.cache).get_mut(&key)
            && !entry.stale.contains(&line)
        {
            entry.stale.push(line);
        }
    }

    /// After an update the vendor accepted: with `AfterUpdate::Decrement`,
    /// lowers the cached residue of `line` by `maximumcall` — a lower bound of
    /// what the vendor now reports, so nothing is admitted that a fresh read
    /// would refuse — and keeps the entry's age, so the TTL still bounds how
    /// long the list goes unread. With `Drop`, or if the cached list is not
    /// the one this update was checked against, invalidates the line.
    pub fn settle(
        &self,
        cfg: &ResidueConfig,
        key: ListKey,
        checked: &Arc<LineList>,
        line: Uuid,
        maximumcall: i64,
    ) {
        let mut cache = lock(&self.cache);
        // Only the very list this update was checked against may be lowered:
        // a list read since then may already show the update, and lowering it
        // again would under-report the residue.
        if cfg.after_update == AfterUpdate::Decrement
            && let Some(entry) = cache.get_mut(&key)
            && !entry.stale.contains(&line)
            && let Some(Ok(lines)) = entry.cell.get()
            && Arc::ptr_eq(lines, checked)
            && lines.contains_key(&line)
        {
            let mut lowered = LineList::clone(lines);
            if let Some(residue) = lowered.get_mut(&line) {
                *residue = residue.saturating_sub(maximumcall);
            }
            entry.cell = Arc::new(OnceCell::new_with(Some(Ok(Arc::new(lowered)))));
            return;
        }
        drop(cache);
        self.invalidate(key, line);
    }

    /// The cached list, or one fetch shared by every concurrent miss.
    async fn lines(
        &self,
        cfg: &ResidueConfig,
        lookup: Lookup<'_>,
        key: ListKey,
        line: Uuid,
        on_lookup: impl FnOnce(LookupResult),
    ) -> Result<Arc<LineList>, LookupError> {
        let cell = {
            let mut cache = lock(&self.cache);
            let now = Instant::now();
            let fresh = cache
                .get(&key)
                .filter(|e| now.duration_since(e.created) < cfg.cache_ttl)
                .filter(|e| !e.stale.contains(&line))
                .map(|e| e.cell.clone());
            match fresh {
                Some(cell) => cell,
                None => {
                    if cache.len() >= CACHE_SWEEP_AT {
                        cache.retain(|_, e| now.duration_since(e.created) < cfg.cache_ttl);
                    }
                    let cell = Cell::default();
                    cache.insert(
                        key,
                        CacheEntry {
                            cell: cell.clone(),
                            created: now,
                            stale: Vec::new(),
                        },
                    );
                    cell
                }
            }
        };
        let (result, fetched) = fill(&cell, cfg, lookup, key).await;
        on_lookup(LookupResult::of(&result, fetched));
        if result.is_err() {
            // Concurrent waiters share this failure; the next request retries.
            let mut cache = lock(&self.cache);
            if cache.get(&key).is_some_and(|e| Arc::ptr_eq(&e.cell, &cell)) {
                cache.remove(&key);
            }
        }
        result
    }
}

/// The list in `cell`, fetched by this caller if nobody has yet (single
/// flight); says whether this caller fetched it.
async fn fill(
    cell: &Cell,
    cfg: &ResidueConfig,
    lookup: Lookup<'_>,
    key: ListKey,
) -> (Result<Arc<LineList>, LookupError>, bool) {
    let mut fetched = false;
    let result = cell
        .get_or_init(|| {
            fetched = true;
            fetch(cfg, lookup, key)
        })
        .await
        .clone();
    (result, fetched)
}

async fn fetch(
    cfg: &ResidueConfig,
    lookup: Lookup<'_>,
    key: ListKey,
) -> Result<Arc<LineList>, LookupError> {
    let mut path = cfg
        .path
        .replace("{user_id}", &key.0.hyphenated().to_string());
    if let Some(sub) = key.1 {
        path.push_str("?sub_user_id=");
        path.push_str(&sub.hyphenated().to_string());
    }
    let uri = forward::upstream_uri(lookup.upstream, &path).map_err(|_| LookupError::Upstream)?;
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, lookup.token.authorization().clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(header::ACCEPT_ENCODING, forward::IDENTITY);
    if let Ok(id) = HeaderValue::from_str(lookup.request_id) {
        headers.insert("x-request-id", id);
    }
    let answer = forward::send(
        lookup.client,
        lookup.upstream,
        Method::GET,
        uri,
        headers,
        Bytes::new(),
    )
    .await
    .map_err(|_| LookupError::Upstream)?;
    if answer.status != StatusCode::OK {
        return Err(LookupError::Status(answer.status));
    }
    let doc: Value = serde_json::from_slice(&answer.body).map_err(|_| LookupError::NotJson)?;
    parse_line_list(&doc).map(Arc::new)
}

/// The list at `data.caller_line_list`, else `meta.caller_line_list`, else
/// `data.meta.caller_line_list`. `value` must be a UUID; `residue` a JSON
/// integer or a string holding one. Anything else makes the whole list
/// unusable: admitting against a half-understood list is worse than refusing.
pub fn parse_line_list(doc: &Value) -> Result<LineList, LookupError> {
    let list = [
        doc.pointer("/data/caller_line_list"),
        doc.pointer("/meta/caller_line_list"),
        doc.pointer("/data/meta/caller_line_list"),
    ]
    .into_iter()
    .flatten()
    .find_map(Value::as_array)
    .ok_or(LookupError::NoList)?;
    let mut lines = LineList::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let value = entry
            .get("value")
            .and_then(Value::as_str)
            .and_then(crate::ids::parse_canonical_uuid)
            .ok_or(LookupError::BadEntry(i))?;
        let residue = match entry.get("residue") {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
            _ => None,
        }
        .ok_or(LookupError::BadEntry(i))?;
        lines.insert(value, residue);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: &str = "f352fd9d-b86b-49eb-942c-3ae2f69fa3b0";

    #[test]
    fn list_locations_in_order() {
        let a = json!({"data": {"caller_line_list": [{"value": L, "residue": 3}]}});
        let b = json!({"meta": {"caller_line_list": [{"value": L, "residue": "4"}]}});
        let c = json!({"data": {"meta": {"caller_line_list": [{"value": L, "residue": 5}]}}});
        let id: Uuid = L.parse().unwrap();
        assert_eq!(parse_line_list(&a).unwrap()[&id], 3);
        assert_eq!(parse_line_list(&b).unwrap()[&id], 4);
        assert_eq!(parse_line_list(&c).unwrap()[&id], 5);
        assert!(matches!(
            parse_line_list(&json!({"data": ""})),
            Err(LookupError::NoList)
        ));
    }

    #[test]
    fn bad_entries_make_the_list_unusable() {
        for bad in [
            json!({"value": L, "residue": 1.5}),
            json!({"value": L, "residue": "x"}),
            json!({"value": L, "residue": null}),
            json!({"value": L}),
            json!({"value": "not-a-uuid", "residue": 1}),
            json!({"residue": 1}),
        ] {
            let doc = json!({"data": {"caller_line_list": [bad]}});
            assert!(
                matches!(parse_line_list(&doc), Err(LookupError::BadEntry(0))),
                "{doc}"
            );
        }
    }

    fn cfg(after_update: AfterUpdate) -> ResidueConfig {
        ResidueConfig {
            enabled: true,
            path: "/agent-api/user/{user_id}/task/create".into(),
            cache_ttl: std::time::Duration::from_secs(60),
            on_unavailable: OnUnavailable::Reject,
            after_update,
        }
    }

    fn cached(gate: &ResidueGate, key: ListKey, list: Arc<LineList>) {
        let cell = Arc::new(OnceCell::new_with(Some(Ok(list))));
        lock(&gate.cache).insert(
            key,
            CacheEntry {
                cell,
                created: Instant::now(),
                stale: Vec::new(),
            },
        );
    }

    /// The residue a check of `line` would be answered with from the cache.
    fn residue_of(gate: &ResidueGate, key: ListKey, line: Uuid) -> Option<i64> {
        let cache = lock(&gate.cache);
        let entry = cache.get(&key).filter(|e| !e.stale.contains(&line))?;
        match entry.cell.get() {
            Some(Ok(lines)) => lines.get(&line).copied(),
            _ => None,
        }
    }

    #[test]
    fn settle_decrements_only_the_list_it_was_checked_against() {
        let gate = ResidueGate::default();
        let key = (Uuid::new_v4(), None);
        let line = Uuid::new_v4();
        let checked = Arc::new(LineList::from([(line, 5)]));
        cached(&gate, key, checked.clone());
        gate.settle(&cfg(AfterUpdate::Decrement), key, &checked, line, 3);
        assert_eq!(residue_of(&gate, key, line), Some(2));

        // A list read since the check may already show the update: dropped, not lowered again.
        let newer = Arc::new(LineList::from([(line, 2)]));
        cached(&gate, key, newer);
        gate.settle(&cfg(AfterUpdate::Decrement), key, &checked, line, 3);
        assert_eq!(residue_of(&gate, key, line), None);

        // `drop` always forgets the line.
        cached(&gate, key, checked.clone());
        gate.settle(&cfg(AfterUpdate::Drop), key, &checked, line, 3);
        assert_eq!(residue_of(&gate, key, line), None);
    }

    #[test]
    fn an_update_makes_only_its_own_line_stale() {
        let gate = ResidueGate::default();
        let key = (Uuid::new_v4(), None);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let list = Arc::new(LineList::from([(a, 5), (b, 1)]));
        cached(&gate, key, list.clone());
        gate.settle(&cfg(AfterUpdate::Drop), key, &list, a, 3);
        assert_eq!(residue_of(&gate, key, a), None, "line a is read again");
        assert_eq!(residue_of(&gate, key, b), Some(1), "line b stays cached");
        gate.invalidate(key, b);
        assert_eq!(residue_of(&gate, key, b), None);
        // A decrement never lowers a line already marked stale.
        let gate = ResidueGate::default();
        cached(&gate, key, list.clone());
        gate.invalidate(key, a);
        gate.settle(&cfg(AfterUpdate::Decrement), key, &list, a, 3);
        assert_eq!(residue_of(&gate, key, a), None);
        assert_eq!(residue_of(&gate, key, b), Some(1));
    }

    #[tokio::test]
    async fn line_locks_serialise_and_clean_up() {
        let gate = ResidueGate::default();
        let user = Uuid::new_v4();
        let line = Uuid::new_v4();
        let first = gate.lock_line((user, None), line).await;
        let second = gate.lock_line((user, None), line);
        tokio::pin!(second);
        // The second waits while the first is held.
        assert!(futures_poll_once(&mut second).await.is_none());
        drop(first);
        let second = second.await;
        drop(second);
        assert!(lock(&gate.locks).is_empty(), "the lock table does not grow");
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
