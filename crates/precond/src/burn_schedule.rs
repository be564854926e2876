//! The library's [`Schedule`]s as burn learning-rate schedulers (feature `burn`).
//!
//! [`ScheduledLr`] implements `burn::lr_scheduler::LrScheduler`, so it goes wherever burn's own
//! schedulers go (its `Learner`, or a hand-written loop calling `step()` once per optimizer step).
//! Its record holds the step counter, so a resumed run continues the schedule where it stopped.

use burn::lr_scheduler::{LrScheduler, LrSchedulerRecord};
use burn::optim::LearningRate;

use crate::error::{invalid, Result};
use crate::schedule::Schedule;

/// Record key of the number of steps taken.
const STEP_KEY: &str = "step";

/// A [`Schedule`] times a peak learning rate, stepped by burn. The `t`-th call of `step()`
/// (1-based) returns `base · schedule.factor(t)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledLr {
    schedule: Schedule,
    base: f64,
    steps: u64,
}

impl ScheduledLr {
    /// A scheduler at step 0. Errors on an invalid schedule or a non-finite or negative base.
    pub fn new(schedule: Schedule, base: f64) -> Result<Self> {
        schedule.validate()?;
        if !(base.is_finite() && base >= 0.0) {
            return Err(invalid(
                "base learning rate",
                base,
                "must be finite and >= 0",
            ));
        }
        Ok(Self {
            schedule,
            base,
            steps: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }
}

impl LrScheduler for ScheduledLr {
    fn step(&mut self) -> LearningRate {
        self.steps += 1;
        self.schedule.lr(self.base, self.steps)
    }

    fn to_record(&self) -> LrSchedulerRecord {
        LrSchedulerRecord::new().with_scalar(STEP_KEY, self.steps)
    }

    /// Restores the step counter; a record without it (an empty one) restarts at step 0.
    fn load_record(&mut self, record: LrSchedulerRecord) {
        self.steps = record.scalar::<u64>(STEP_KEY).unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_schedule_and_resume_from_the_record() {
        let schedule = Schedule::WarmupLinearDecay {
            warmup_steps: 2,
            total_steps: 6,
        };
        let mut lr = ScheduledLr::new(schedule, 0.4).unwrap();
        let first: Vec<f64> = (0..3).map(|_| lr.step()).collect();
        assert_eq!(first, vec![0.2, 0.4, 0.4 * 3.0 / 4.0]);
        let bytes = lr.to_record().into_bytes().unwrap();
        let mut resumed = ScheduledLr::new(schedule, 0.4).unwrap();
        resumed.load_record(LrSchedulerRecord::from_bytes(bytes).unwrap());
        assert_eq!(resumed.steps(), 3);
        let rest: Vec<f64> = (0..4).map(|_| resumed.step()).collect();
        let expected: Vec<f64> = (4..=7).map(|t| schedule.lr(0.4, t)).collect();
        assert_eq!(rest, expected);
        assert_eq!(rest[2..], [0.0, 0.0]);
    }

    #[test]
    fn invalid_schedules_and_rates_are_errors() {
        let bad = Schedule::WarmupRsqrt { warmup_steps: 0 };
        assert!(ScheduledLr::new(bad, 1.0).is_err());
        let err = ScheduledLr::new(Schedule::Constant, f64::NAN)
            .unwrap_err()
            .to_string();
        assert!(err.contains("base learning rate"), "{err}");
    }
}
