//! What a run shows while it trains. On a terminal: a per-step bar (step, loss, step time,
//! elapsed, ETA) with the per-epoch lines printed above it. Anywhere else (a log file, CI, a
//! pipe), or with `PRECOND_PROGRESS=plain`: the per-epoch lines alone, as plain text on stderr.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Environment variable that forces plain lines (`plain`) or the bar (`bar`) whatever stderr is.
pub const PROGRESS_ENV: &str = "PRECOND_PROGRESS";

/// The bar: position, the step's loss and time, and the clock.
const TEMPLATE: &str =
    "step {pos}/{len} {wide_bar} {msg}  elapsed {elapsed_precise}  ETA {eta_precise}";

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A bar redrawn on stderr at most ten times a second.
    Bar,
    /// Plain lines only.
    Plain,
}

impl Mode {
    /// [`Mode::Bar`] when stderr is a terminal, unless [`PROGRESS_ENV`] says otherwise.
    pub fn detect() -> Mode {
        Mode::choose(
            std::env::var(PROGRESS_ENV).ok().as_deref(),
            std::io::stderr().is_terminal(),
        )
    }

    fn choose(setting: Option<&str>, terminal: bool) -> Mode {
        match setting {
            Some("plain") => Mode::Plain,
            Some("bar") => Mode::Bar,
            _ if terminal => Mode::Bar,
            _ => Mode::Plain,
        }
    }
}

/// The progress display of one run.
pub struct Display {
    bar: Option<ProgressBar>,
}

impl Display {
    /// A display for a run of `total` steps of which `done` are already done (a resumed run).
    pub fn new(mode: Mode, total: usize, done: usize) -> Display {
        let bar = match mode {
            Mode::Plain => None,
            Mode::Bar => {
                let bar = ProgressBar::with_draw_target(
                    Some(total as u64),
                    ProgressDrawTarget::stderr_with_hz(10),
                );
                // The template is a constant: a failure to parse it is a bug caught by the tests.
                if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
                    bar.set_style(style);
                }
                bar.set_position(done as u64);
                bar.reset_eta();
                Some(bar)
            }
        };
        Display { bar }
    }

    /// After step `step` (1-based, over the whole run): its loss and its time.
    pub fn step(&self, step: usize, loss: f64, step_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(step_message(loss, step_s));
        }
    }

    /// A line of text: above the bar on a terminal, else on stderr.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Removes the bar (the lines printed above it stay).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Whether a bar is shown (tests).
    #[cfg(test)]
    fn is_bar(&self) -> bool {
        self.bar.is_some()
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        // An error return leaves the loop early: do not leave a half-drawn bar behind.
        self.finish();
    }
}

/// The bar's message after a step: its loss and how long it took.
fn step_message(loss: f64, step_s: f64) -> String {
    let ms = step_s.max(0.0) * 1e3;
    format!("loss {loss:.4}  step {ms:.0} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_follows_the_terminal_unless_the_variable_says_otherwise() {
        assert_eq!(Mode::choose(None, true), Mode::Bar);
        assert_eq!(Mode::choose(None, false), Mode::Plain);
        assert_eq!(Mode::choose(Some("plain"), true), Mode::Plain);
        assert_eq!(Mode::choose(Some("bar"), false), Mode::Bar);
        // Anything else falls back to the terminal test.
        assert_eq!(Mode::choose(Some("fancy"), false), Mode::Plain);
        assert_eq!(Mode::choose(Some(""), true), Mode::Bar);
    }

    #[test]
    fn the_bar_template_parses_and_tracks_the_steps() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
        let display = Display::new(Mode::Bar, 600, 120);
        assert!(display.is_bar());
        let bar = display.bar.as_ref().map(|b| (b.position(), b.length()));
        assert_eq!(bar, Some((120, Some(600))));
        display.step(121, 104.5, 0.75);
        let bar = display.bar.as_ref().map(|b| (b.position(), b.message()));
        assert_eq!(bar, Some((121, "loss 104.5000  step 750 ms".to_string())));
        assert!(!Display::new(Mode::Plain, 600, 0).is_bar());
    }

    #[test]
    fn the_step_message_rounds_to_milliseconds() {
        assert_eq!(step_message(60.80612, 0.3555), "loss 60.8061  step 356 ms");
        assert_eq!(step_message(1.0, -1.0), "loss 1.0000  step 0 ms");
    }
}
