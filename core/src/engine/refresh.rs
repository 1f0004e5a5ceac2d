//! The refresh of one grant as an explicit state machine.
//!
//! [`Refresh::step`] is pure: given the time and what the last action came
//! to, it moves to the next state and says what to do next. The async driver
//! in `token.rs` only performs those actions (read the grant, take the lease,
//! wait, call the provider, write) and feeds their outcomes back. Every rule
//! of the refresh path is therefore here, in one `match`, with its bounds
//! named:
//!
//! * only the holder of the grant's lease calls the provider, and it re-reads
//!   the grant under the lease first (the previous holder may have stored a
//!   new token between our read and our lease);
//! * a refreshed grant is written before its token is answered; a rotated
//!   refresh token the store will not take is kept as a pending write, and
//!   the lease with it;
//! * a request waits at most one lease period for another instance;
//! * "the refresh token changed under us" starts a new round, at most
//!   [`REFRESH_ROUNDS`] times.

use std::time::Duration;

use super::error::EngineError;
use crate::store::LeaseOutcome;
use crate::time::Timestamp;

/// Rounds of "someone else changed the refresh token, read again" one
/// refresh goes through: a few are plenty, more means something is flapping.
pub(crate) const REFRESH_ROUNDS: u32 = 4;
/// Compare-and-swap conflicts one grant write absorbs before it gives up.
pub(crate) const WRITE_CONFLICTS: u32 = 16;
/// The lease is renewed every TTL / this while the provider answers.
pub(crate) const LEASE_RENEW_FRACTION: u32 = 3;

/// Where a refresh stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Reading the grant without the lease: another instance may have refreshed it.
    Reading,
    /// Asking the store for the grant's lease.
    Leasing,
    /// Another instance holds the lease: waiting for its notice, the next poll or its deadline.
    Waiting,
    /// Lease held: re-reading the grant.
    Leased,
    /// Lease held and renewed: the provider call runs.
    Refreshing,
    /// Lease held: storing the refreshed grant before anyone sees its token.
    Persisting {
        /// The provider rotated the refresh token: the new one exists only here.
        rotated: bool,
    },
    /// Lease held: marking the grant for a new login.
    MarkingReauth,
    /// Giving the lease back before the next round.
    Releasing,
    /// Finished.
    Done,
}

impl State {
    fn holds_lease(self) -> bool {
        matches!(
            self,
            State::Leased | State::Refreshing | State::Persisting { .. } | State::MarkingReauth | State::Releasing
        )
    }
}

/// How a read grant compares with what the request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// The stored access token will do.
    Usable,
    /// It must be refreshed.
    Stale,
}

/// What the provider call came to.
#[derive(Debug)]
pub(crate) enum Called {
    /// A new access token; whether the refresh token was rotated.
    Refreshed {
        /// A new refresh token came with it.
        rotated: bool,
    },
    /// The provider refused the refresh token.
    InvalidGrant,
    /// The provider is down, limiting us, or its breaker is open.
    Unavailable {
        /// When to try again.
        retry_after: Duration,
    },
    /// Not retryable here (provider not configured, or refusing our client).
    Refused(EngineError),
    /// This instance lost the lease while the provider answered.
    LeaseLost(EngineError),
}

/// What storing the refreshed grant came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Stored.
    Stored,
    /// Another writer stored a newer refresh token first.
    Superseded,
    /// The grant was revoked (or deleted) meanwhile.
    Revoked,
    /// The store would not take it.
    Failed,
}

/// What one action came to.
#[derive(Debug)]
pub(crate) enum Event {
    /// The grant as read (refusals — revoked, re-login needed — and store errors as `Err`).
    Read(Result<Stored, EngineError>),
    /// The store's answer to a lease request.
    Lease(Result<LeaseOutcome, EngineError>),
    /// A notice arrived, or the wait ran out.
    Woken,
    /// The provider call ended.
    Called(Called),
    /// The refreshed grant's write ended.
    Written(Written),
    /// The re-login mark: `Ok(true)` written, `Ok(false)` the refresh token changed meanwhile.
    Marked(Result<bool, EngineError>),
    /// The lease was given back.
    Released,
}

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Read the grant and judge it; `watch`: register for notices first, so
    /// one that arrives between the read and a wait is not lost.
    Read {
        /// Register for notices before reading.
        watch: bool,
    },
    /// Ask for the lease until `deadline`.
    TakeLease {
        /// The lease's deadline.
        deadline: Timestamp,
    },
    /// Wait for a notice, or until `until`.
    Wait {
        /// Wake up then at the latest.
        until: Timestamp,
    },
    /// Call the provider, keeping the lease alive; no retry starts at or after `retries_until`.
    CallProvider {
        /// The last moment a retry may start.
        retries_until: Timestamp,
    },
    /// Store the refreshed grant.
    Persist,
    /// Mark the grant as needing a new login.
    MarkReauth,
    /// Give the lease back (a new round follows).
    Release,
    /// Finish: end the lease this way, answer that.
    Finish(LeaseEnd, Answer),
}

/// How a finished refresh leaves its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// It never took one.
    NotHeld,
    /// Give it back.
    Release,
    /// Keep it (renewed by the pending write's flusher): no other instance
    /// may refresh with the rotated-away token.
    KeepForPending,
}

/// What the caller is answered.
#[derive(Debug, PartialEq)]
pub(crate) enum Answer {
    /// The stored token as last read (another instance refreshed it).
    Adopted,
    /// The refreshed token; `stored`: it was written (tell the waiters).
    Refreshed {
        /// The write succeeded.
        stored: bool,
    },
    /// The stored token while it has any validity left, else "retry then".
    ProviderDown {
        /// When to retry.
        retry_after: Duration,
    },
    /// The grant was revoked during the refresh; `revoke_new`: the refresh
    /// token just obtained must be revoked at the provider.
    Revoked {
        /// The provider rotated, so a new live token exists.
        revoke_new: bool,
    },
    /// The provider refused the grant; it is marked for a new login.
    ReauthRequired,
    /// Kept as a pending write; the caller retries.
    Pending,
    /// An error as it is.
    Fail(EngineError),
}

/// The bounds a refresh runs within.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// How long a lease is held without renewal (and how long a request
    /// waits for another instance's).
    pub(crate) lease_ttl: Duration,
    /// How often a waiting request re-reads without a notice.
    pub(crate) lease_poll: Duration,
    /// "Retry after" when the rounds run out.
    pub(crate) retry_after: Duration,
}

/// One grant's refresh.
#[derive(Debug)]
pub(crate) struct Refresh {
    state: State,
    bounds: Bounds,
    round: u32,
    /// The end of this round's wait for other instances.
    give_up: Timestamp,
}

impl Refresh {
    /// A refresh whose caller just read the grant and found it stale: it
    /// starts by taking the lease (one read saved).
    pub(crate) fn after_stale_read(now: Timestamp, bounds: Bounds) -> (Self, Action) {
        let give_up = now.saturating_add(bounds.lease_ttl);
        let machine = Refresh { state: State::Leasing, bounds, round: 0, give_up };
        (machine, Action::TakeLease { deadline: give_up })
    }

    /// The current state.
    #[cfg(test)]
    pub(crate) fn state(&self) -> State {
        self.state
    }

    /// Moves on with what the last action came to.
    pub(crate) fn step(&mut self, now: Timestamp, event: Event) -> Action {
        let lease_deadline = now.saturating_add(self.bounds.lease_ttl);
        let (state, action) = match (self.state, event) {
            (State::Reading, Event::Read(Ok(Stored::Usable))) => finish(LeaseEnd::NotHeld, Answer::Adopted),
            (State::Reading, Event::Read(Ok(Stored::Stale))) => {
                (State::Leasing, Action::TakeLease { deadline: lease_deadline })
            }
            (State::Leasing, Event::Lease(Ok(LeaseOutcome::Acquired { .. }))) => {
                (State::Leased, Action::Read { watch: false })
            }
            (State::Leasing, Event::Lease(Ok(LeaseOutcome::Held { .. }))) if now >= self.give_up => {
                // Another instance has held this grant's refresh for a whole
                // lease period: the store answers (it just said so), so the
                // wait is on the provider that instance is calling. Said as
                // a provider that is slow, with its retry, not as a store
                // that cannot be reached.
                let busy = EngineError::ProviderUnavailable { retry_after: self.bounds.retry_after };
                finish(LeaseEnd::NotHeld, Answer::Fail(busy))
            }
            (State::Leasing, Event::Lease(Ok(LeaseOutcome::Held { deadline, .. }))) => {
                let until = deadline.min(now.saturating_add(self.bounds.lease_poll));
                (State::Waiting, Action::Wait { until })
            }
            (State::Waiting, Event::Woken) => (State::Reading, Action::Read { watch: true }),
            (State::Leased, Event::Read(Ok(Stored::Usable))) => finish(LeaseEnd::Release, Answer::Adopted),
            (State::Leased, Event::Read(Ok(Stored::Stale))) => {
                (State::Refreshing, Action::CallProvider { retries_until: lease_deadline })
            }
            (State::Refreshing, Event::Called(called)) => match called {
                Called::Refreshed { rotated } => (State::Persisting { rotated }, Action::Persist),
                Called::InvalidGrant => (State::MarkingReauth, Action::MarkReauth),
                Called::Unavailable { retry_after } => finish(LeaseEnd::Release, Answer::ProviderDown { retry_after }),
                // A lost lease is another instance's now; releasing it is a
                // no-op the store answers "not yours".
                Called::Refused(e) | Called::LeaseLost(e) => finish(LeaseEnd::Release, Answer::Fail(e)),
            },
            (State::Persisting { rotated }, Event::Written(written)) => match written {
                Written::Stored => finish(LeaseEnd::Release, Answer::Refreshed { stored: true }),
                Written::Superseded => self.next_round(),
                Written::Revoked => finish(LeaseEnd::Release, Answer::Revoked { revoke_new: rotated }),
                Written::Failed if rotated => finish(LeaseEnd::KeepForPending, Answer::Pending),
                // Nothing rotated: the stored refresh token still works, so
                // the fresh access token may be served.
                Written::Failed => finish(LeaseEnd::Release, Answer::Refreshed { stored: false }),
            },
            (State::MarkingReauth, Event::Marked(Ok(true))) => finish(LeaseEnd::Release, Answer::ReauthRequired),
            (State::MarkingReauth, Event::Marked(Ok(false))) => self.next_round(),
            (State::Releasing, Event::Released) => {
                self.give_up = now.saturating_add(self.bounds.lease_ttl);
                (State::Reading, Action::Read { watch: true })
            }
            // Store errors and refusals end the refresh as they are.
            (state, Event::Read(Err(e)) | Event::Lease(Err(e)) | Event::Marked(Err(e))) => {
                finish(lease_end(state), Answer::Fail(e))
            }
            (state, event) => {
                // Not reachable from the driver; answered, never panicked on.
                let detail = format!("refresh state machine: {event:?} in state {state:?}");
                finish(lease_end(state), Answer::Fail(EngineError::Corrupt { detail }))
            }
        };
        self.state = state;
        action
    }

    /// The refresh token changed under us: give the lease back and start a
    /// new round, unless the rounds are used up.
    fn next_round(&mut self) -> (State, Action) {
        self.round += 1;
        if self.round >= REFRESH_ROUNDS {
            let flapping = EngineError::ProviderUnavailable { retry_after: self.bounds.retry_after };
            return finish(LeaseEnd::Release, Answer::Fail(flapping));
        }
        (State::Releasing, Action::Release)
    }
}

fn finish(lease: LeaseEnd, answer: Answer) -> (State, Action) {
    (State::Done, Action::Finish(lease, answer))
}

fn lease_end(state: State) -> LeaseEnd {
    if state.holds_lease() { LeaseEnd::Release } else { LeaseEnd::NotHeld }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_unix_secs(1_000_000 + secs)
    }

    const BOUNDS: Bounds = Bounds {
        lease_ttl: Duration::from_secs(30),
        lease_poll: Duration::from_secs(1),
        retry_after: Duration::from_secs(7),
    };

    fn acquired() -> Event {
        Event::Lease(Ok(LeaseOutcome::Acquired { deadline: t(30) }))
    }

    fn held(until: u64) -> Event {
        Event::Lease(Ok(LeaseOutcome::Held { owner: "other".into(), deadline: t(until) }))
    }

    /// Runs `events` (each at its time) and returns the actions taken.
    fn run(events: Vec<(u64, Event)>) -> (Refresh, Vec<Action>) {
        let (mut machine, first) = Refresh::after_stale_read(t(0), BOUNDS);
        let mut actions = vec![first];
        for (at, event) in events {
            actions.push(machine.step(t(at), event));
        }
        (machine, actions)
    }

    #[test]
    fn a_cold_refresh_takes_the_lease_reads_once_under_it_and_stores_before_answering() {
        let (machine, actions) = run(vec![
            (0, acquired()),
            (0, Event::Read(Ok(Stored::Stale))),
            (2, Event::Called(Called::Refreshed { rotated: true })),
            (2, Event::Written(Written::Stored)),
        ]);
        assert_eq!(
            actions,
            vec![
                Action::TakeLease { deadline: t(30) },
                Action::Read { watch: false },
                Action::CallProvider { retries_until: t(30) },
                Action::Persist,
                Action::Finish(LeaseEnd::Release, Answer::Refreshed { stored: true }),
            ]
        );
        assert_eq!(machine.state(), State::Done);
    }

    #[test]
    fn a_token_stored_by_the_previous_holder_is_adopted_under_the_lease() {
        let (_, actions) = run(vec![(0, acquired()), (0, Event::Read(Ok(Stored::Usable)))]);
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::Release, Answer::Adopted)));
    }

    #[test]
    fn a_held_lease_is_waited_for_until_poll_or_deadline_then_given_up_after_one_ttl() {
        let (mut machine, actions) = run(vec![(0, held(20))]);
        assert_eq!(actions[1], Action::Wait { until: t(1) }, "polls every lease_poll");
        assert_eq!(machine.step(t(1), Event::Woken), Action::Read { watch: true });
        assert_eq!(machine.step(t(1), Event::Read(Ok(Stored::Stale))), Action::TakeLease { deadline: t(31) });
        // Holder's deadline nearer than the next poll.
        assert_eq!(machine.step(t(19), held(20)), Action::Wait { until: t(20) });
        machine.step(t(20), Event::Woken);
        assert_eq!(
            machine.step(t(20), Event::Read(Ok(Stored::Usable))),
            Action::Finish(LeaseEnd::NotHeld, Answer::Adopted),
            "another instance's token is adopted without a lease"
        );
        let (mut machine, _) = run(vec![]);
        assert_eq!(
            machine.step(t(30), held(60)),
            Action::Finish(
                LeaseEnd::NotHeld,
                Answer::Fail(EngineError::ProviderUnavailable { retry_after: BOUNDS.retry_after })
            ),
            "a request waits one lease period at most, then is told the provider is slow"
        );
    }

    #[test]
    fn a_failed_write_keeps_the_lease_only_for_a_rotated_token() {
        let to_write = |rotated| {
            vec![
                (0, acquired()),
                (0, Event::Read(Ok(Stored::Stale))),
                (1, Event::Called(Called::Refreshed { rotated })),
                (1, Event::Written(Written::Failed)),
            ]
        };
        let (_, actions) = run(to_write(true));
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::KeepForPending, Answer::Pending)));
        let (_, actions) = run(to_write(false));
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::Release, Answer::Refreshed { stored: false })));
    }

    #[test]
    fn revoked_during_the_refresh_revokes_the_new_token_only_if_rotated() {
        for rotated in [true, false] {
            let (_, actions) = run(vec![
                (0, acquired()),
                (0, Event::Read(Ok(Stored::Stale))),
                (1, Event::Called(Called::Refreshed { rotated })),
                (1, Event::Written(Written::Revoked)),
            ]);
            assert_eq!(
                actions.last(),
                Some(&Action::Finish(LeaseEnd::Release, Answer::Revoked { revoke_new: rotated }))
            );
        }
    }

    #[test]
    fn superseded_writes_start_new_rounds_until_the_rounds_run_out() {
        let (mut machine, _) = run(vec![(0, acquired()), (0, Event::Read(Ok(Stored::Stale)))]);
        for round in 1..=REFRESH_ROUNDS {
            machine.step(t(1), Event::Called(Called::Refreshed { rotated: true }));
            let action = machine.step(t(1), Event::Written(Written::Superseded));
            if round == REFRESH_ROUNDS {
                let flapping = EngineError::ProviderUnavailable { retry_after: BOUNDS.retry_after };
                assert_eq!(action, Action::Finish(LeaseEnd::Release, Answer::Fail(flapping)));
                break;
            }
            assert_eq!(action, Action::Release);
            assert_eq!(machine.step(t(2), Event::Released), Action::Read { watch: true });
            assert_eq!(machine.step(t(2), Event::Read(Ok(Stored::Stale))), Action::TakeLease { deadline: t(32) });
            machine.step(t(2), acquired());
            machine.step(t(2), Event::Read(Ok(Stored::Stale)));
        }
    }

    #[test]
    fn an_invalid_grant_is_marked_for_relogin_unless_the_token_changed_meanwhile() {
        let to_mark =
            || vec![(0, acquired()), (0, Event::Read(Ok(Stored::Stale))), (1, Event::Called(Called::InvalidGrant))];
        let (mut machine, actions) = run(to_mark());
        assert_eq!(actions.last(), Some(&Action::MarkReauth));
        assert_eq!(
            machine.step(t(1), Event::Marked(Ok(true))),
            Action::Finish(LeaseEnd::Release, Answer::ReauthRequired)
        );
        let (mut machine, _) = run(to_mark());
        assert_eq!(
            machine.step(t(1), Event::Marked(Ok(false))),
            Action::Release,
            "someone stored a new token: adopt it"
        );
    }

    #[test]
    fn errors_release_a_held_lease_and_never_one_not_held() {
        let gone = || EngineError::AuthIdRevoked;
        let (_, actions) = run(vec![(0, Event::Lease(Err(gone())))]);
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::NotHeld, Answer::Fail(gone()))));
        let (_, actions) = run(vec![(0, acquired()), (0, Event::Read(Err(gone())))]);
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::Release, Answer::Fail(gone()))));
        let (_, actions) = run(vec![
            (0, acquired()),
            (0, Event::Read(Ok(Stored::Stale))),
            (9, Event::Called(Called::LeaseLost(gone()))),
        ]);
        assert_eq!(actions.last(), Some(&Action::Finish(LeaseEnd::Release, Answer::Fail(gone()))));
        let (_, actions) = run(vec![
            (0, acquired()),
            (0, Event::Read(Ok(Stored::Stale))),
            (9, Event::Called(Called::Unavailable { retry_after: Duration::from_secs(3) })),
        ]);
        assert_eq!(
            actions.last(),
            Some(&Action::Finish(LeaseEnd::Release, Answer::ProviderDown { retry_after: Duration::from_secs(3) }))
        );
    }

    #[test]
    fn an_event_out_of_place_is_an_error_not_a_panic_and_keeps_the_lease_rule() {
        let (_, actions) = run(vec![(0, acquired()), (0, Event::Written(Written::Stored))]);
        assert!(
            matches!(
                actions.last(),
                Some(Action::Finish(LeaseEnd::Release, Answer::Fail(EngineError::Corrupt { .. })))
            ),
            "{actions:?}"
        );
        let (_, actions) = run(vec![(0, Event::Woken)]);
        assert!(matches!(actions.last(), Some(Action::Finish(LeaseEnd::NotHeld, Answer::Fail(_)))));
    }
}
