//! Who is speaking in a room, from the RFC 6464 audio levels publishers put on their audio
//! packets; sans-IO and pure (samples and evaluations take `now`).
//!
//! Each speaker's score is the mean loudness of its packets over the last second, where a packet
//! quieter than [`SPEAKING_DBOV`] counts as silence and louder ones count more (0 dBov = 1). The
//! active speakers are those scoring at least [`MIN_SCORE`], loudest first; the first, the dominant
//! speaker, only gives way to someone louder by [`SWITCH_MARGIN`], so two people talking over each
//! other do not flip it on every evaluation.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How far back the scores look.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Audio level (−dBov) at or below which a packet counts as speech; quieter is silence.
pub const SPEAKING_DBOV: u8 = 50;
/// Least score of an active speaker (e.g. speech at −25 dBov for a third of the window).
pub const MIN_SCORE: f32 = 0.15;
/// Factor by which a challenger must outscore the dominant speaker to take its place.
pub const SWITCH_MARGIN: f32 = 1.3;
/// Fewer samples than this in the window: not enough to call someone a speaker.
const MIN_SAMPLES: usize = 5;
/// Bound on samples kept per speaker (50/s at 20 ms packets; guards against floods).
const MAX_SAMPLES: usize = 200;

#[derive(Default)]
struct Samples {
    /// (arrival, weight in 0..=1)
    recent: VecDeque<(Instant, f32)>,
    sum: f32,
}

impl Samples {
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, w)) = self.recent.front() {
            if now.saturating_duration_since(at) <= WINDOW && self.recent.len() <= MAX_SAMPLES {
                break;
            }
            self.recent.pop_front();
            self.sum -= w;
        }
        if self.recent.is_empty() {
            self.sum = 0.0; // no drift from float subtraction
        }
    }

    fn score(&self) -> f32 {
        if self.recent.len() < MIN_SAMPLES { 0.0 } else { (self.sum / self.recent.len() as f32).clamp(0.0, 1.0) }
    }
}

/// The loudness weight of one packet's level (−dBov, 0..=127): 0 for silence.
pub fn weight(level_dbov: u8) -> f32 {
    let level = level_dbov.min(127);
    if level >= SPEAKING_DBOV { 0.0 } else { f32::from(SPEAKING_DBOV - level) / f32::from(SPEAKING_DBOV) }
}

/// Active speaker detection for one room, keyed by participant.
pub struct SpeakerDetector<K> {
    speakers: HashMap<K, Samples>,
    /// Active speakers after the last evaluation, dominant first.
    active: Vec<(K, f32)>,
}

impl<K: Copy + Eq + Hash + Ord> Default for SpeakerDetector<K> {
    fn default() -> Self {
        Self { speakers: HashMap::new(), active: Vec::new() }
    }
}

impl<K: Copy + Eq + Hash + Ord> SpeakerDetector<K> {
    /// One audio packet of `who` with its audio level (−dBov, 0 loudest, 127 silence).
    pub fn observe(&mut self, now: Instant, who: K, level_dbov: u8) {
        let s = self.speakers.entry(who).or_default();
        let w = weight(level_dbov);
        s.recent.push_back((now, w));
        s.sum += w;
        if s.recent.len() > MAX_SAMPLES {
            s.prune(now);
        }
    }

    /// `who` left the room (or stopped publishing audio): no longer a speaker.
    pub fn remove(&mut self, who: K) {
        self.speakers.remove(&who);
    }

    /// The dominant speaker after the last evaluation.
    pub fn dominant(&self) -> Option<K> {
        self.active.first().map(|(k, _)| *k)
    }

    /// Active speakers after the last evaluation, dominant first, with their scores.
    pub fn active(&self) -> &[(K, f32)] {
        &self.active
    }

    /// Recomputes the active speakers; returns them when who they are or their order changed
    /// (a change of scores alone is not news).
    pub fn evaluate(&mut self, now: Instant) -> Option<&[(K, f32)]> {
        let mut scored: Vec<(K, f32)> = Vec::new();
        self.speakers.retain(|k, s| {
            s.prune(now);
            let score = s.score();
            if score >= MIN_SCORE {
                scored.push((*k, score));
            }
            !s.recent.is_empty()
        });
        // Loudest first; ties by key so the order does not depend on hashing.
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Hysteresis for the dominant spot.
        if let Some(incumbent) = self.dominant()
            && let Some(pos) = scored.iter().position(|(k, _)| *k == incumbent)
            && pos > 0
            && scored[0].1 < scored[pos].1 * SWITCH_MARGIN
        {
            let kept = scored.remove(pos);
            scored.insert(0, kept);
        }
        let changed = scored.len() != self.active.len() || scored.iter().zip(&self.active).any(|(a, b)| a.0 != b.0);
        self.active = scored;
        changed.then_some(&self.active[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `levels` (one per participant, `None` = sends nothing) every 20 ms for `ms`.
    fn feed(d: &mut SpeakerDetector<u32>, start: Instant, from_ms: u64, ms: u64, levels: &[(u32, Option<u8>)]) {
        let mut t = from_ms;
        while t < from_ms + ms {
            for &(who, level) in levels {
                if let Some(l) = level {
                    d.observe(start + Duration::from_millis(t), who, l);
                }
            }
            t += 20;
        }
    }

    fn names(active: &[(u32, f32)]) -> Vec<u32> {
        active.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn weights_table() {
        for (level, want) in [(0u8, 1.0f32), (25, 0.5), (49, 0.02), (50, 0.0), (90, 0.0), (127, 0.0), (255, 0.0)] {
            assert!((weight(level) - want).abs() < 1e-6, "level {level}: {} != {want}", weight(level));
        }
    }

    #[test]
    fn loud_one_is_active_silent_ones_are_not() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, 0, 1000, &[(1, Some(10)), (2, Some(127)), (3, Some(60))]);
        let active = d.evaluate(t0 + Duration::from_millis(1000)).map(names);
        assert_eq!(active, Some(vec![1]));
        assert_eq!(d.dominant(), Some(1));
        let score = d.active()[0].1;
        assert!((score - 0.8).abs() < 0.01, "score {score}");
        // Same situation again: no news.
        feed(&mut d, t0, 1000, 300, &[(1, Some(10)), (2, Some(127))]);
        assert!(d.evaluate(t0 + Duration::from_millis(1300)).is_none());
    }

    #[test]
    fn silence_or_no_packets_ends_speaking() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, 0, 1000, &[(1, Some(10))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(1000)).map(names), Some(vec![1]));
        // Muted: the browser keeps sending at level 127.
        feed(&mut d, t0, 1000, 1000, &[(1, Some(127))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(2000)).map(names), Some(vec![]));
        // Speaking again, then nothing at all arrives (track stopped).
        feed(&mut d, t0, 2000, 1000, &[(1, Some(20))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(3000)).map(names), Some(vec![1]));
        assert_eq!(d.evaluate(t0 + Duration::from_millis(4100)).map(names), Some(vec![]));
        assert_eq!(d.dominant(), None);
    }

    #[test]
    fn brief_noise_is_not_speech() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        // A 60 ms click at −5 dBov in a silent second: score 3 × 0.9 / 50 ≈ 0.05.
        feed(&mut d, t0, 0, 940, &[(1, Some(127))]);
        feed(&mut d, t0, 940, 60, &[(1, Some(5))]);
        assert!(d.evaluate(t0 + Duration::from_millis(1000)).is_none());
        assert!(d.active().is_empty());
    }

    #[test]
    fn dominant_speaker_hysteresis() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        feed(&mut d, t0, 0, 1000, &[(1, Some(20)), (2, Some(127))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(1000)).map(names), Some(vec![1]));
        // 2 starts, a little louder than 1 (0.66 vs 0.6): both active, 1 stays dominant.
        feed(&mut d, t0, 1000, 1000, &[(1, Some(20)), (2, Some(17))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(2000)).map(names), Some(vec![1, 2]));
        // 2 much louder (0.9 vs 0.6 > 1.3×): takes over.
        feed(&mut d, t0, 2000, 1000, &[(1, Some(20)), (2, Some(5))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(3000)).map(names), Some(vec![2, 1]));
        // 1 stops: 2 alone.
        feed(&mut d, t0, 3000, 1000, &[(1, Some(127)), (2, Some(5))]);
        assert_eq!(d.evaluate(t0 + Duration::from_millis(4000)).map(names), Some(vec![2]));
    }

    #[test]
    fn removed_participant_is_gone_and_floods_are_bounded() {
        let t0 = Instant::now();
        let mut d = SpeakerDetector::default();
        // 10,000 packets in one instant: kept bounded, still a speaker.
        for _ in 0..10_000 {
            d.observe(t0, 7, 0);
        }
        assert_eq!(d.evaluate(t0).map(names), Some(vec![7]));
        assert!(d.speakers[&7].recent.len() <= MAX_SAMPLES);
        d.remove(7);
        assert_eq!(d.evaluate(t0).map(names), Some(vec![]));
    }
}
