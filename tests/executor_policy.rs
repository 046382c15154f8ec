//! The executor's job policy, pure: what it decides after each provider
//! answer, error, timeout or nothing yet — and, over random inputs, that it
//! never moves a job a provider may have executed to another provider, never
//! asks for an illegal status change, retries at most `max_retries` times
//! with bounded backoff, and is deterministic.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal_macros::dec;
use treasury::domain::{Currency, JobStatus, Money};
use treasury::executor::policy::{
    CallError, Calls, Decision, Input, JobFacts, PolicySettings, Review, backoff, decide,
};
use treasury::providers::ProviderState;

fn settings() -> PolicySettings {
    PolicySettings {
        max_retries: 3,
        retry_initial: Duration::from_millis(500),
        retry_max: Duration::from_secs(8),
        stale_after: chrono::Duration::minutes(30),
        conversion_timeout: chrono::Duration::minutes(60),
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap()
}

fn minutes(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

fn pending(chosen: bool, called_before: bool) -> JobFacts {
    JobFacts {
        status: JobStatus::Pending,
        provider_chosen: chosen,
        called_before,
        provider_tx_known: false,
        created_at: t0(),
        submitted_at: None,
        stale_flagged: false,
    }
}

fn at_provider(
    status: JobStatus,
    submitted_minutes_ago: i64,
    stale: bool,
) -> (JobFacts, DateTime<Utc>) {
    let now = t0() + minutes(120);
    (
        JobFacts {
            status,
            provider_chosen: true,
            called_before: true,
            provider_tx_known: true,
            created_at: t0(),
            submitted_at: Some(now - minutes(submitted_minutes_ago)),
            stale_flagged: stale,
        },
        now,
    )
}

fn completed() -> ProviderState {
    ProviderState::Completed {
        destination_amount: Money::new(Currency::Usd, dec!(99.5)).unwrap(),
        fee: Money::new(Currency::Usdc, dec!(0.1)).unwrap(),
        rate: dec!(0.9995),
    }
}

const NOTHING_DONE: CallError = CallError::NothingDone { retry_after: None };

/// Feeds `errors` as the answers to successive calls at one provider in one
/// lease; returns the decision after each.
fn run_calls(job: &JobFacts, errors: &[CallError], now: DateTime<Utc>) -> Vec<Decision> {
    let mut calls = Calls::default();
    errors
        .iter()
        .map(|e| {
            calls.record(Err(*e));
            decide(job, &calls, Input::Initiated(Err(*e)), now, &settings())
        })
        .collect()
}

#[test]
fn nothing_yet_chooses_calls_polls_completes_or_stops() {
    let s = settings();
    let none = Calls::default();
    let cases = [
        (pending(false, false), Decision::ChooseProvider),
        (
            pending(true, false),
            Decision::Call {
                after: Duration::ZERO,
            },
        ),
        (
            pending(true, true),
            Decision::Call {
                after: Duration::ZERO,
            },
        ),
        (
            at_provider(JobStatus::ProviderSubmitted, 1, false).0,
            Decision::Poll,
        ),
        (
            at_provider(JobStatus::ProviderProcessing, 1, false).0,
            Decision::Poll,
        ),
        (
            JobFacts {
                provider_tx_known: false,
                ..at_provider(JobStatus::ProviderSubmitted, 1, false).0
            },
            Decision::NeedsReview(Review::NothingToAsk),
        ),
        (
            JobFacts {
                status: JobStatus::ProviderCompleted,
                ..pending(true, true)
            },
            Decision::Complete,
        ),
    ];
    for (job, expected) in cases {
        assert_eq!(
            decide(&job, &none, Input::Nothing, t0(), &s),
            expected,
            "{job:?}"
        );
    }
    for status in [
        JobStatus::LedgerUpdating,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::NeedsReview,
    ] {
        let job = JobFacts {
            status,
            ..pending(true, true)
        };
        assert_eq!(
            decide(&job, &none, Input::Nothing, t0(), &s),
            Decision::Stop,
            "{status}"
        );
    }
}

#[test]
fn nothing_done_errors_are_retried_with_doubling_backoff_then_fall_back() {
    let decisions = run_calls(&pending(true, false), &[NOTHING_DONE; 4], t0());
    assert_eq!(
        decisions,
        vec![
            Decision::Call {
                after: Duration::from_millis(500)
            },
            Decision::Call {
                after: Duration::from_millis(1000)
            },
            Decision::Call {
                after: Duration::from_millis(2000)
            },
            Decision::FallBack,
        ]
    );
}

#[test]
fn a_provider_asking_to_wait_longer_is_waited_for() {
    let asked = CallError::NothingDone {
        retry_after: Some(Duration::from_secs(30)),
    };
    assert_eq!(
        run_calls(&pending(true, false), &[asked], t0()),
        vec![Decision::Call {
            after: Duration::from_secs(30)
        }]
    );
    assert_eq!(
        backoff(9, NOTHING_DONE, &settings()),
        Duration::from_secs(8),
        "capped"
    );
}

#[test]
fn a_final_refusal_of_a_fresh_call_falls_back_at_once() {
    assert_eq!(
        run_calls(&pending(true, false), &[CallError::Refused], t0()),
        vec![Decision::FallBack]
    );
}

#[test]
fn an_unanswered_call_holds_the_job_at_its_provider() {
    // Lost once, then "nothing done" until the retries run out: the first
    // call may have executed, so no fallback.
    let decisions = run_calls(
        &pending(true, false),
        &[
            CallError::OutcomeUnknown,
            NOTHING_DONE,
            NOTHING_DONE,
            NOTHING_DONE,
        ],
        t0() + minutes(5),
    );
    assert_eq!(decisions.last(), Some(&Decision::Hold));
}

#[test]
fn a_call_recorded_by_an_earlier_lease_holds_even_on_nothing_done() {
    let decisions = run_calls(&pending(true, true), &[NOTHING_DONE; 4], t0() + minutes(5));
    assert_eq!(decisions.last(), Some(&Decision::Hold));
}

#[test]
fn a_held_job_goes_to_a_person_on_a_refusal_or_after_the_timeout() {
    let refused = run_calls(
        &pending(true, true),
        &[CallError::Refused],
        t0() + minutes(5),
    );
    assert_eq!(
        refused,
        vec![Decision::NeedsReview(Review::MayHoldConversion {
            waited: minutes(5),
            refused: true
        })]
    );
    let late = run_calls(
        &pending(true, true),
        &[CallError::OutcomeUnknown; 4],
        t0() + minutes(61),
    );
    assert_eq!(
        late.last(),
        Some(&Decision::NeedsReview(Review::MayHoldConversion {
            waited: minutes(61),
            refused: false
        }))
    );
}

#[test]
fn an_accepted_call_is_recorded_then_followed_like_a_poll() {
    let s = settings();
    let mut calls = Calls::default();
    calls.record(Ok(()));
    assert_eq!(
        decide(
            &pending(true, false),
            &calls,
            Input::Initiated(Ok(&ProviderState::Processing)),
            t0(),
            &s
        ),
        Decision::RecordSubmitted
    );
    let (submitted, now) = at_provider(JobStatus::ProviderSubmitted, 0, false);
    assert_eq!(
        decide(
            &submitted,
            &calls,
            Input::Polled(Ok(&ProviderState::Processing)),
            now,
            &s
        ),
        Decision::RecordProcessing
    );
    assert_eq!(
        decide(&submitted, &calls, Input::Polled(Ok(&completed())), now, &s),
        Decision::RecordCompleted
    );
    let failed = ProviderState::Failed {
        reason: "no liquidity".into(),
    };
    assert_eq!(
        decide(&submitted, &calls, Input::Polled(Ok(&failed)), now, &s),
        Decision::Fail {
            reason: "no liquidity".into()
        }
    );
}

#[test]
fn a_job_waiting_at_its_provider_is_flagged_stale_then_handed_to_a_person() {
    let s = settings();
    let none = Calls::default();
    let ask = |minutes_ago, stale, answer: Input<'_>| {
        let (job, now) = at_provider(JobStatus::ProviderProcessing, minutes_ago, stale);
        decide(&job, &none, answer, now, &s)
    };
    let processing = Input::Polled(Ok(&ProviderState::Processing));
    let timed_out = Input::Polled(Err(CallError::OutcomeUnknown));
    assert_eq!(ask(5, false, processing), Decision::PollLater);
    assert_eq!(ask(30, false, processing), Decision::FlagStale);
    assert_eq!(
        ask(45, true, timed_out),
        Decision::PollLater,
        "flagged once"
    );
    assert_eq!(
        ask(60, true, timed_out),
        Decision::NeedsReview(Review::NoFinalAnswer {
            waited: minutes(60)
        })
    );
}

// ----------------------------------------------------------------- properties

fn status() -> impl Strategy<Value = JobStatus> {
    (0usize..9).prop_map(|i| JobStatus::ALL[i])
}

fn call_error() -> impl Strategy<Value = CallError> {
    prop_oneof![
        Just(CallError::OutcomeUnknown),
        Just(CallError::Refused),
        proptest::option::of(0u64..120_000).prop_map(|ms| CallError::NothingDone {
            retry_after: ms.map(Duration::from_millis)
        }),
    ]
}

fn provider_state() -> impl Strategy<Value = ProviderState> {
    prop_oneof![
        Just(ProviderState::Submitted),
        Just(ProviderState::Processing),
        Just(completed()),
        Just(ProviderState::Failed {
            reason: "refused".into()
        }),
    ]
}

#[derive(Debug, Clone)]
enum Happened {
    Nothing,
    Initiated(Result<ProviderState, CallError>),
    Polled(Result<ProviderState, CallError>),
}

fn happened() -> impl Strategy<Value = Happened> {
    let answer = || prop_oneof![provider_state().prop_map(Ok), call_error().prop_map(Err)];
    prop_oneof![
        Just(Happened::Nothing),
        answer().prop_map(Happened::Initiated),
        answer().prop_map(Happened::Polled),
    ]
}

fn answer(r: &Result<ProviderState, CallError>) -> Result<&ProviderState, CallError> {
    r.as_ref().map_err(|e| *e)
}

fn input(h: &Happened) -> Input<'_> {
    match h {
        Happened::Nothing => Input::Nothing,
        Happened::Initiated(r) => Input::Initiated(answer(r)),
        Happened::Polled(r) => Input::Polled(answer(r)),
    }
}

fn facts() -> impl Strategy<Value = JobFacts> {
    (
        status(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(0i64..10_000),
        any::<bool>(),
    )
        .prop_map(|(status, chosen, called, tx, submitted, stale)| JobFacts {
            status,
            provider_chosen: chosen,
            called_before: chosen && called,
            provider_tx_known: tx,
            created_at: t0(),
            submitted_at: submitted.map(|s| t0() + chrono::Duration::seconds(s)),
            stale_flagged: stale,
        })
}

fn calls() -> impl Strategy<Value = Calls> {
    (0u32..10, any::<bool>()).prop_map(|(made, unanswered)| Calls { made, unanswered })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever happened, the decision asks only for a legal status change,
    /// is deterministic, and never moves a job whose provider may hold the
    /// conversion.
    #[test]
    fn decisions_are_legal_sticky_bounded_and_deterministic(
        job in facts(),
        calls in calls(),
        h in happened(),
        later in 0i64..20_000,
    ) {
        let s = settings();
        let now = t0() + chrono::Duration::seconds(later);
        let decision = decide(&job, &calls, input(&h), now, &s);
        prop_assert_eq!(&decision, &decide(&job, &calls, input(&h), now, &s));

        if let Some(next) = decision.status_after() {
            let step = if decision == Decision::Complete { JobStatus::LedgerUpdating } else { next };
            prop_assert!(job.status.can_become(step), "{:?} from {}", decision, job.status);
        }
        match &decision {
            Decision::FallBack => {
                prop_assert!(!job.called_before && !calls.unanswered, "fell back from a provider that may hold it");
                prop_assert_eq!(job.status, JobStatus::Pending);
            }
            Decision::ChooseProvider => {
                prop_assert!(job.status == JobStatus::Pending && !job.provider_chosen);
            }
            Decision::Call { after } => {
                prop_assert!(job.status == JobStatus::Pending && job.provider_chosen);
                let asked = match &h {
                    Happened::Initiated(Err(CallError::NothingDone { retry_after: Some(a) })) => *a,
                    _ => Duration::ZERO,
                };
                prop_assert!(*after <= s.retry_max.max(asked));
            }
            Decision::Hold => prop_assert!(job.called_before || calls.unanswered),
            _ => {}
        }
        // The worker relies on each recording decision coming with its answer.
        match &decision {
            Decision::RecordSubmitted => {
                prop_assert!(matches!(h, Happened::Initiated(Ok(_))), "{:?}", h);
            }
            Decision::RecordCompleted => {
                prop_assert!(matches!(h, Happened::Polled(Ok(ProviderState::Completed { .. }))), "{:?}", h);
            }
            Decision::FallBack | Decision::Hold => {
                prop_assert!(matches!(h, Happened::Initiated(Err(_))), "{:?}", h);
            }
            _ => {}
        }
        if job.status.is_final() || job.status == JobStatus::NeedsReview {
            prop_assert_eq!(decision, Decision::Stop, "a final job or one with a person is left alone");
        }
    }

    /// Calls at one provider in one lease: at most `max_retries + 1`, and a
    /// run that ever went unanswered ends held or with a person, never at
    /// another provider.
    #[test]
    fn one_lease_makes_at_most_max_retries_plus_one_calls(
        errors in prop::collection::vec(call_error(), 1..12),
        called_before in any::<bool>(),
        later in 0i64..10_000,
    ) {
        let job = pending(true, called_before);
        let now = t0() + chrono::Duration::seconds(later);
        let mut calls = Calls::default();
        let mut made = 0;
        let mut end = None;
        for e in &errors {
            calls.record(Err(*e));
            made += 1;
            match decide(&job, &calls, Input::Initiated(Err(*e)), now, &settings()) {
                Decision::Call { .. } => continue,
                other => { end = Some(other); break; }
            }
        }
        prop_assert!(made <= settings().max_retries + 1);
        if let Some(end) = end {
            let unanswered = errors[..made as usize].contains(&CallError::OutcomeUnknown);
            if called_before || unanswered {
                prop_assert!(matches!(end, Decision::Hold | Decision::NeedsReview(_)), "{:?}", end);
            } else {
                prop_assert_eq!(end, Decision::FallBack);
            }
        }
    }
}
