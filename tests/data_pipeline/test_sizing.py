"""smart_resize and the video budget follow Keye-VL-2.0's sizing rules, checked on hand-worked cases."""

import pytest

from data_pipeline.sizing import (
    PAPER_ADAPTIVE_SCHEDULE,
    RELEASED_INFERENCE_SCHEDULE,
    ImageBudget,
    RejectedMedia,
    VideoBudget,
    duration_factor,
    plan_video,
    smart_resize,
)


def test_smart_resize_rounds_to_multiples_of_28():
    # 180/28 = 6.43 -> 168; 320/28 = 11.43 -> 308; 168*308 = 51744 lies inside the bounds.
    assert smart_resize(180, 320, min_pixels=3136, max_pixels=10**8) == (168, 308)


def test_smart_resize_shrinks_over_the_max():
    # 1280x720 under 256 tokens (200704 px): beta = sqrt(921600/200704) = 2.1429; 720/2.1429/28 = 12.0 -> 336,
    # 1280/2.1429/28 = 21.33 -> 21*28 = 588; 336*588 = 197568 <= 200704.
    h, w = smart_resize(720, 1280, min_pixels=50176, max_pixels=200704)
    assert (h, w) == (336, 588) and h * w <= 200704


def test_smart_resize_grows_under_the_min():
    # 20x30 up to 3136 px: beta = sqrt(3136/600) = 2.286; ceil(45.7/28)*28 = 56, ceil(68.6/28)*28 = 84.
    assert smart_resize(20, 30, min_pixels=3136, max_pixels=10**8) == (56, 84)


def test_extreme_aspect_ratio_is_rejected_with_a_reason():
    with pytest.raises(RejectedMedia) as err:
        ImageBudget().resize(10, 2010)
    assert err.value.reason == "aspect_ratio"
    assert ImageBudget().resize(10, 2000)  # exactly 200:1 is allowed


def test_adaptive_schedules():
    assert [duration_factor(d, PAPER_ADAPTIVE_SCHEDULE) for d in (10, 256, 257, 600, 1500, 2048, 7200)] == [
        0.125,
        0.125,
        0.25,
        0.5,
        1.0,
        1.0,
        1.0,
    ]
    assert duration_factor(300, RELEASED_INFERENCE_SCHEDULE) == 0.18


def test_one_hour_video_is_capped_at_2880_frames_of_64_tokens():
    plan = plan_video(3600.0, 25.0, 720, 1280, VideoBudget())
    assert len(plan.times) == 2880 and plan.tokens_per_frame <= 64
    assert len(plan.times) * plan.tokens_per_frame <= 184320


def test_short_video_at_two_fps_and_budget_split_over_videos():
    budget = VideoBudget(video_total_tokens=24576, frame_max_tokens=1024, adaptive=False)
    plan = plan_video(15.0, 30.0, 720, 1280, budget)
    assert len(plan.times) == 30
    assert plan.times[0] == 0.0 and abs(plan.times[-1] - (15.0 - 1 / 30)) < 1e-9
    assert 30 * plan.tokens_per_frame <= 24576 and plan.tokens_per_frame > 700  # ~800 tokens per frame
    two = plan_video(15.0, 30.0, 720, 1280, budget, videos_in_sample=2)
    assert 30 * two.tokens_per_frame <= 12288 < 30 * plan.tokens_per_frame


def test_fps_never_exceeds_the_source_and_bad_video_is_rejected():
    plan = plan_video(10.0, 1.0, 64, 64, VideoBudget(fps=4.0, adaptive=False))
    assert len(plan.times) == 10
    with pytest.raises(RejectedMedia) as err:
        plan_video(0.0, 25.0, 64, 64, VideoBudget())
    assert err.value.reason == "empty_video"
    with pytest.raises(ValueError, match="fps"):
        VideoBudget(fps=5.0)
