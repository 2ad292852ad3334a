//! Dividing one subscriber's estimated downlink among its video tracks, sans-IO and pure.
//!
//! Audio is served first. Video tracks are taken in priority order (pinned, screen share, active
//! speaker, the rest); each first gets its lowest layer if that fits, or is paused; then, still in
//! priority order, each climbs layer by layer (temporal sub-layers between spatial steps) as far as
//! the budget allows, but never above the smallest layer that covers the size the subscriber
//! displays it at. Hysteresis: a track keeps its current layer while the budget covers 90% of
//! it, and moves above it only with 10% headroom, so small estimate wobbles do not flap layers.

/// How much the subscriber cares about a track, highest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Normal = 0,
    Speaker = 1,
    ScreenShare = 2,
    Pinned = 3,
}

/// Why a video track is not being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PauseReason {
    /// Even the lowest layer does not fit the subscriber's estimated bandwidth.
    Bandwidth,
    /// The subscriber does not display it.
    Hidden,
    /// The publisher sends no layer at the moment.
    FeedDry,
}

impl PauseReason {
    pub const ALL: [PauseReason; 3] = [PauseReason::Bandwidth, PauseReason::Hidden, PauseReason::FeedDry];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Bandwidth => "bandwidth",
            PauseReason::Hidden => "hidden",
            PauseReason::FeedDry => "feed_dry",
        }
    }
}

/// One spatial layer a track offers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerOption {
    pub spatial: u8,
    pub dims: Option<(u16, u16)>,
    pub bps: u64,
    /// Sending now, or paused at the publisher by us but resumable.
    pub available: bool,
    /// Temporal layers the stream has (1 when none).
    pub temporal_layers: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VideoDemand {
    pub id: u64,
    pub priority: Priority,
    /// Ascending by spatial index.
    pub layers: Vec<LayerOption>,
    /// Size the subscriber displays the track at; `None`: unknown, no limit.
    pub display: Option<(u16, u16)>,
    pub visible: bool,
    /// The allocation it has now: (spatial, temporal), `None` if paused.
    pub current: Option<(u8, u8)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Allocation {
    pub id: u64,
    /// (spatial, temporal) to forward, or `None` (paused).
    pub target: Option<(u8, u8)>,
    pub pause: Option<PauseReason>,
    /// Bitrate the allocation is expected to use.
    pub bps: u64,
    /// Total bitrate this track would use at its next step up, when the budget is what stops it.
    pub next_bps: Option<u64>,
    /// Bitrate of the best step the subscriber could use (displayed size, layers offered),
    /// whatever the budget: what probing aims for.
    pub wanted_bps: u64,
}

const KEEP_FACTOR: f64 = 0.9;
const UPGRADE_FACTOR: f64 = 1.1;

/// Share of a layer's bitrate used by temporal layers 0..=t, for streams with n temporal layers.
fn temporal_share(n: u8, t: u8) -> f64 {
    match (n, t) {
        (3, 0) => 0.5,
        (3, 1) => 0.7,
        (2, 0) => 0.6,
        _ => 1.0,
    }
}

#[derive(Clone, Copy, Debug)]
struct Step {
    spatial: u8,
    temporal: u8,
    bps: u64,
}

/// The steps a demand can take, cheapest first, capped at what the subscriber displays.
fn steps(d: &VideoDemand) -> Vec<Step> {
    let usable: Vec<&LayerOption> = d.layers.iter().filter(|l| l.available && l.bps > 0).collect();
    let cap = match d.display {
        Some((w, h)) if w > 0 && h > 0 => usable
            .iter()
            .position(|l| l.dims.is_some_and(|(lw, lh)| f64::from(lw) >= f64::from(w) * 0.8 || f64::from(lh) >= f64::from(h) * 0.8))
            .unwrap_or(usable.len().saturating_sub(1)),
        _ => usable.len().saturating_sub(1),
    };
    let mut out = Vec::new();
    for (i, l) in usable.iter().take(cap + 1).enumerate() {
        let n = l.temporal_layers.max(1);
        // Above the lowest layer, a quarter frame rate is not a step up: 640x360 at 30 fps looks
        // better than 1280x720 at 7.5, and costs about the same.
        let first = if i > 0 && n >= 3 { 1 } else { 0 };
        for t in first..n {
            out.push(Step { spatial: l.spatial, temporal: if t + 1 == n { u8::MAX } else { t }, bps: (l.bps as f64 * temporal_share(n, t)) as u64 });
        }
    }
    out
}

/// Allocates `budget_bps` (the estimate) after `audio_bps` among the video demands.
pub fn allocate(budget_bps: u64, audio_bps: u64, demands: &[VideoDemand]) -> Vec<Allocation> {
    let mut left = budget_bps.saturating_sub(audio_bps) as f64;
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(demands[i].priority), i));
    let all_steps: Vec<Vec<Step>> = demands.iter().map(steps).collect();
    let mut chosen: Vec<Option<usize>> = vec![None; demands.len()];
    let mut pause: Vec<Option<PauseReason>> = vec![None; demands.len()];
    // The effective cost of taking step k: discounted if it is at or below the current one.
    let cost = |i: usize, k: usize| -> f64 {
        let s = all_steps[i][k];
        let at_or_below_current = demands[i].current.is_some_and(|(cs, ct)| (s.spatial, s.temporal) <= (cs, ct));
        s.bps as f64 * if at_or_below_current { KEEP_FACTOR } else { UPGRADE_FACTOR }
    };
    // First pass: everyone visible gets their lowest step if it fits.
    for &i in &order {
        let d = &demands[i];
        if !d.visible {
            pause[i] = Some(PauseReason::Hidden);
            continue;
        }
        if all_steps[i].is_empty() {
            pause[i] = Some(PauseReason::FeedDry);
            continue;
        }
        let c = cost(i, 0);
        if c <= left {
            left -= c;
            chosen[i] = Some(0);
        } else {
            pause[i] = Some(PauseReason::Bandwidth);
        }
    }
    // Second pass: climb, highest priority first.
    let mut next_bps: Vec<Option<u64>> = vec![None; demands.len()];
    for &i in &order {
        let Some(mut k) = chosen[i] else { continue };
        while k + 1 < all_steps[i].len() {
            let extra = cost(i, k + 1) - cost(i, k);
            if extra <= left {
                left -= extra;
                k += 1;
            } else {
                next_bps[i] = Some(all_steps[i][k + 1].bps);
                break;
            }
        }
        chosen[i] = Some(k);
    }
    for i in 0..demands.len() {
        if pause[i] == Some(PauseReason::Bandwidth)
            && let Some(first) = all_steps[i].first()
        {
            next_bps[i] = Some(first.bps);
        }
    }
    (0..demands.len())
        .map(|i| {
            let step = chosen[i].map(|k| all_steps[i][k]);
            Allocation {
                id: demands[i].id,
                target: step.map(|s| (s.spatial, s.temporal)),
                pause: pause[i],
                bps: step.map_or(0, |s| s.bps),
                next_bps: next_bps[i],
                wanted_bps: if demands[i].visible { all_steps[i].last().map_or(0, |s| s.bps) } else { 0 },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u8 = u8::MAX;

    /// A 720p simulcast camera: q 320x180 150k, h 640x360 500k, f 1280x720 1.7M.
    fn camera(id: u64) -> VideoDemand {
        VideoDemand {
            id,
            priority: Priority::Normal,
            layers: vec![
                LayerOption { spatial: 0, dims: Some((320, 180)), bps: 150_000, available: true, temporal_layers: 1 },
                LayerOption { spatial: 1, dims: Some((640, 360)), bps: 500_000, available: true, temporal_layers: 1 },
                LayerOption { spatial: 2, dims: Some((1280, 720)), bps: 1_700_000, available: true, temporal_layers: 1 },
            ],
            display: None,
            visible: true,
            current: None,
        }
    }

    fn targets(a: &[Allocation]) -> Vec<Option<(u8, u8)>> {
        a.iter().map(|x| x.target).collect()
    }

    #[test]
    fn one_camera_at_various_estimates() {
        // (estimate, expected target) — audio takes 50k first.
        let rows: &[(u64, Option<(u8, u8)>, Option<PauseReason>)] = &[
            (5_000_000, Some((2, ALL)), None),
            (2_200_000, Some((2, ALL)), None),
            (1_500_000, Some((1, ALL)), None),
            (700_000, Some((1, ALL)), None),
            (500_000, Some((0, ALL)), None),
            (250_000, Some((0, ALL)), None),
            (150_000, None, Some(PauseReason::Bandwidth)),
            (0, None, Some(PauseReason::Bandwidth)),
        ];
        for &(est, want, pause) in rows {
            let a = allocate(est, 50_000, &[camera(1)]);
            assert_eq!(a[0].target, want, "estimate {est}");
            assert_eq!(a[0].pause, pause, "estimate {est}");
        }
    }

    #[test]
    fn never_above_what_is_displayed() {
        let rows: &[(Option<(u16, u16)>, u8)] = &[
            (Some((1280, 720)), 2),
            (Some((640, 360)), 1),
            (Some((560, 315)), 1), // 640 ≥ 0.8 × 560
            (Some((480, 270)), 1),
            (Some((300, 170)), 0),
            (Some((100, 56)), 0),
            (Some((1920, 1080)), 2),
            (None, 2),
        ];
        for &(display, want) in rows {
            let mut d = camera(1);
            d.display = display;
            let a = allocate(10_000_000, 0, &[d]);
            assert_eq!(a[0].target.map(|t| t.0), Some(want), "display {display:?}");
        }
    }

    #[test]
    fn priority_decides_who_gets_the_bandwidth() {
        let mut screen = camera(2);
        screen.priority = Priority::ScreenShare;
        let cams = [camera(1), screen, camera(3)];
        // 2.6M: screen gets f (1.7M·1.1), the cameras share what is left.
        let a = allocate(2_600_000, 0, &cams);
        assert_eq!(targets(&a), vec![Some((1, ALL)), Some((2, ALL)), Some((0, ALL))]);
        // 400k: screen first, then one camera; the last pauses.
        let a = allocate(400_000, 0, &cams);
        assert_eq!(targets(&a), vec![Some((0, ALL)), Some((0, ALL)), None]);
        assert_eq!(a[2].pause, Some(PauseReason::Bandwidth));
        assert_eq!(a[2].next_bps, Some(150_000), "it says what it would need");
        // Pinning beats screen share.
        let mut pinned = camera(1);
        pinned.priority = Priority::Pinned;
        let a = allocate(2_100_000, 0, &[pinned, cams[1].clone()]);
        assert_eq!(targets(&a), vec![Some((2, ALL)), Some((0, ALL))]);
        // The active speaker's camera comes before other cameras, after screen share.
        let mut speaker = camera(3);
        speaker.priority = Priority::Speaker;
        let a = allocate(400_000, 0, &[camera(1), cams[1].clone(), speaker.clone()]);
        assert_eq!(targets(&a), vec![None, Some((0, ALL)), Some((0, ALL))], "the speaker keeps video, the other camera pauses");
        let a = allocate(1_000_000, 0, &[camera(1), speaker]);
        assert_eq!(targets(&a), vec![Some((0, ALL)), Some((1, ALL))], "the speaker climbs first");
    }

    #[test]
    fn hidden_and_dry_tracks_pause_with_their_reason() {
        let mut hidden = camera(1);
        hidden.visible = false;
        let mut dry = camera(2);
        for l in &mut dry.layers {
            l.available = false;
        }
        let a = allocate(10_000_000, 0, &[hidden, dry, camera(3)]);
        assert_eq!(a[0].pause, Some(PauseReason::Hidden));
        assert_eq!(a[1].pause, Some(PauseReason::FeedDry));
        assert_eq!(a[2].target, Some((2, ALL)), "the rest is for the visible one");
    }

    #[test]
    fn hysteresis_keeps_the_current_layer_through_small_dips() {
        let mut d = camera(1);
        // Reaching h needs 150k·1.1 + 350k·1.1 = 550k.
        assert_eq!(allocate(540_000, 0, std::slice::from_ref(&d))[0].target, Some((0, ALL)));
        assert_eq!(allocate(560_000, 0, std::slice::from_ref(&d))[0].target, Some((1, ALL)));
        // Once on h, it stays down to 90% of its cost (450k)…
        d.current = Some((1, ALL));
        assert_eq!(allocate(460_000, 0, std::slice::from_ref(&d))[0].target, Some((1, ALL)));
        // …and drops below that.
        assert_eq!(allocate(440_000, 0, std::slice::from_ref(&d))[0].target, Some((0, ALL)));
    }

    #[test]
    fn temporal_layers_fill_the_gaps_between_spatial_steps() {
        let mut d = camera(1);
        for l in &mut d.layers {
            l.temporal_layers = 3;
        }
        // f costs 1.7M in full, 70% of it (T0+T1, half the frame rate) 1.19M; a quarter frame
        // rate is used only on the lowest layer.
        let rows: &[(u64, (u8, u8))] = &[
            (3_000_000, (2, ALL)),
            (1_500_000, (2, 1)),
            (1_100_000, (1, ALL)),
            (700_000, (1, ALL)),
            (450_000, (1, 1)),
            (350_000, (0, ALL)),
            (200_000, (0, ALL)),
            (90_000, (0, 0)),
        ];
        for &(est, want) in rows {
            assert_eq!(allocate(est, 0, std::slice::from_ref(&d))[0].target, Some(want), "estimate {est}");
        }
    }

    #[test]
    fn layers_without_a_measured_bitrate_are_not_chosen() {
        let mut d = camera(1);
        d.layers[2].bps = 0;
        assert_eq!(allocate(10_000_000, 0, &[d])[0].target, Some((1, ALL)));
    }
}
