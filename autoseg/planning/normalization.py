"""Per-channel intensity normalisation scheme from dataset.json channel names (reference §4.8)."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence

log = logging.getLogger("autoseg.planning")

#: Channel name (lower-cased) -> normalisation registry key used by preprocessing.
SCHEMES = {
    "ct": "ct",
    "nonorm": "none",
    "zscore": "zscore",
    "rescale_to_0_1": "rescale01",
    "rgb_to_0_1": "rgb01",
}
#: MR sequence names: per-image z-score is the intended scheme, so no warning is logged.
MR_NAMES = frozenset(
    {"mri", "mr", "t1", "t1w", "t2", "t2w", "flair", "t1gd", "t1ce", "t1c", "adc", "dwi", "pd", "pdw",
     "swi", "hbv", "cine", "bold"}
)
#: Median crop ratio below which z-score is computed inside the nonzero mask only.
MASK_CROP_THRESHOLD = 0.75


def normalization_scheme(channel_name: str) -> str:
    """The scheme key for one channel name: ct, none, zscore, rescale01 or rgb01.

    Any other name gets per-image z-score (nnU-Net's silent fallback); unless it is a common MR
    sequence name, a warning names the channel, so that a typo of "CT" does not quietly lose
    CT normalisation.
    """
    key = channel_name.strip().lower()
    if key in SCHEMES:
        return SCHEMES[key]
    if key in MR_NAMES:
        log.debug("channel %r: per-image z-score (MR sequence)", channel_name)
        return "zscore"
    close = difflib.get_close_matches(key, list(SCHEMES), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    log.warning(
        "channel %r is not a known normalisation name%s; using per-image z-score. Known names: %s",
        channel_name, hint, ", ".join(SCHEMES),
    )
    return "zscore"


def normalization_schemes(channel_names: Sequence[str]) -> tuple[str, ...]:
    """One scheme key per channel, in channel order."""
    return tuple(normalization_scheme(name) for name in channel_names)


def use_mask_for_norm(schemes: Sequence[str], median_relative_size_after_crop: float) -> tuple[bool, ...]:
    """Per channel: normalise inside the nonzero mask only when cropping removed more than 25 % of
    the median image (skull-stripped brains: the zero background would skew mean and std) and
    the scheme is z-score, the only scheme that then keeps the outside at zero."""
    crops = median_relative_size_after_crop < MASK_CROP_THRESHOLD
    return tuple(crops and scheme == "zscore" for scheme in schemes)
