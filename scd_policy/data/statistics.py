"""Fitting a policy's normaliser on the train split of a replay buffer, one episode at a time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scd_policy.conventions import policy_shape, steps_to_policy
from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer
from scd_policy.models.normalizer import Normalizer, RunningStats, stat_shape


def fit_normalizer(
    buffer: ReplayBuffer,
    episode_ids: Sequence[int] | np.ndarray,
    keys_modes: Mapping[str, str],
    rename: Mapping[str, str] | None = None,
) -> Normalizer:
    """Fit a normaliser on the given episodes (the train split) of a buffer, one episode at a time.

    Shapes are the policy's (images CHW); image keys in mode "image" need no data and are not read.
    ``rename`` maps buffer keys to the names the policy uses (e.g. a custom action key -> "action").
    """
    rename = dict(rename or {})
    missing = [key for key in keys_modes if key not in buffer.keys]
    if missing:
        raise KeyError(f"normaliser keys {missing} are not in {buffer.path}; known keys: {buffer.keys}")
    ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("fit_normalizer needs at least one episode")
    shapes = {rename.get(key, key): policy_shape(buffer.shapes[key]) for key in keys_modes}
    normalizer = Normalizer(shapes, {rename.get(key, key): mode for key, mode in keys_modes.items()})
    for key, mode in keys_modes.items():
        if mode == "image":
            continue
        name = rename.get(key, key)
        stats = RunningStats.empty(stat_shape(shapes[name]))
        for episode in ids:
            span = buffer.episode_slice(int(episode))
            values = buffer.get_steps(key, np.arange(span.start, span.stop))
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                step = int(np.argwhere(~np.isfinite(values).reshape(len(values), -1).all(axis=1))[0][0])
                raise DatasetError(
                    f"data/{key} in {buffer.path} holds NaN or inf (episode {int(episode)}, its step "
                    f"{step}); the policy cannot be fitted on it — clean or re-record that episode"
                )
            stats.update(steps_to_policy(values, buffer.shapes[key]))
        normalizer.set_stats(name, *stats.offset_scale(mode))
    normalizer.fitted.fill_(True)
    return normalizer
