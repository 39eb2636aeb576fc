"""The one policy protocol shared by ``scd``, ``causal_diffusion`` and ``diffusion_policy``.

A policy is an ``nn.Module`` holding its ``PolicyConfig`` and its fitted ``Normalizer`` (a submodule, so
the statistics travel in the state_dict). Everything a trainer, an evaluator or a runtime needs:

- ``compute_loss(batch) -> (loss, metrics)``: raw-unit batch from ``WindowedDataset``; never mutated.
- ``param_groups(lr, weight_decay)``: AdamW groups; no decay on gains, biases and embeddings; the SCD
  decoder's groups get ``lr * config.decoder_lr_scale``.
- ``predict_chunk(history) -> (B, H, Da)``: stateless inference in raw units.
- the streaming protocol a runtime drives, over an opaque per-stream ``StreamState`` that the policy
  creates and that knows how to reset and measure itself: ``init_state(num_streams)``,
  ``observe(state, obs, prev_action, prev_valid)`` once per control tick, ``sample(state, rows)`` for
  the streams that replan, and ``compile_denoiser()`` for the network the K-step loop calls. A runtime
  needs nothing else, so a new policy type plugs in without touching it. ``observe_many`` /
  ``sample_many`` do the same for several separate single-stream states at once (a policy server's
  sessions, each ticking at its own pace); by default one call per state, batched where a policy can.
- ``save_pretrained(dir)`` / ``from_pretrained(dir)``: ``model.safetensors`` + ``config.json`` (resolved
  config, normaliser layout, policy type, format version); no pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import safetensors.torch
import torch
from torch import Tensor, nn

from scd_policy.config import ConfigError, PolicyConfig, policy_config_from_dict
from scd_policy.conventions import ACTION_KEY
from scd_policy.io import atomic_write_bytes, atomic_write_text, sha256_file
from scd_policy.models.normalizer import Normalizer

FORMAT_NAME = "scd-policy"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A policy folder is missing, incomplete, corrupt, of another policy type or format version."""


class StreamState(ABC):
    """What a policy keeps per stream between control ticks (a KV cache, an observation window).

    Opaque to the runtime, which only resets it and asks its size; the policy that made it reads it.
    """

    @abstractmethod
    def reset(self, streams: Tensor | None = None) -> None:
        """Forget the history of every stream (None) or of the streams where ``streams`` (N,) is True."""

    def nbytes(self) -> int:
        """Bytes of history held (for memory accounting); 0 when it is negligible."""
        return 0


# policy_type -> class, filled by every concrete subclass as it is defined (see __init_subclass__).
_REGISTRY: dict[str, type[Policy]] = {}


def policy_class(policy_type: str) -> type[Policy]:
    """The class registered for ``policy_type`` (importing ``scd_policy.policies`` registers the three)."""
    if policy_type not in _REGISTRY:
        raise ConfigError(f"unknown policy type {policy_type!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[policy_type]


def registered_policies() -> dict[str, type[Policy]]:
    return dict(_REGISTRY)


StateT = TypeVar("StateT", bound=StreamState)


class Policy(nn.Module, ABC):
    """Base of every policy; subclasses set ``policy_type`` and implement the abstract methods.

    A subclass that sets ``policy_type`` registers itself under that name: ``policy_class(name)``,
    ``make_policy`` and ``load_policy`` find it without any list to edit.
    """

    policy_type: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("policy_type")
        if name is None:  # an intermediate base (CausalPolicy)
            return
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise TypeError(f"policy type {name!r} is registered twice: {_REGISTRY[name]} and {cls}")
        _REGISTRY[name] = cls

    def __init__(self, config: PolicyConfig, normalizer: Normalizer) -> None:
        super().__init__()
        if config.type != self.policy_type:
            raise ConfigError(
                f"{type(self).__name__} is the {self.policy_type!r} policy; config.type is {config.type!r}"
            )
        if config.action_dim < 1:
            raise ConfigError(
                "policy.action_dim is not set; fill it from the dataset before building a policy"
            )
        if not config.input_shapes:
            raise ConfigError(
                "policy.input_shapes is empty; fill it from the dataset before building a policy"
            )
        expected = {key: tuple(shape) for key, shape in config.input_shapes.items()}
        expected[ACTION_KEY] = (config.action_dim,)
        for key, shape in expected.items():
            have = normalizer.shapes.get(key)
            if have is None:
                raise ConfigError(f"the normaliser has no key {key!r}; it knows {sorted(normalizer.shapes)}")
            if tuple(have) != shape:
                raise ConfigError(
                    f"normaliser shape of {key!r} is {list(have)}; the config says {list(shape)}"
                )
        self.config = config
        self.normalizer = normalizer
        self.obs_keys: list[str] = sorted(config.input_shapes)

    # ------------------------------------------------------------------ the protocol

    @abstractmethod
    def compute_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Training loss on a raw-unit batch (see the subclass for its layout); ``batch`` is not mutated."""

    @abstractmethod
    def predict_chunk(
        self,
        history: Mapping[str, Tensor],
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The action chunk (B, H, Da) in raw units for the last step of ``history``; stateless."""

    # ------------------------------------------------------------------ streaming

    @abstractmethod
    def init_state(self, num_streams: int, context_window: int | None = None) -> StreamState:
        """An empty per-stream state for ``num_streams`` parallel episodes; ``context_window`` bounds
        the steps a causal policy attends to at run time (default ``config.context_window``; the
        windowed baseline's window is its ``n_obs_steps`` and ignores it)."""

    @abstractmethod
    def observe(
        self,
        state: StreamState,
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_valid: Tensor,
        *,
        defer: bool = False,
    ) -> None:
        """Record one control step of every stream: obs[key] (N, *shape) raw, the action executed at the
        previous tick (N, Da) raw, and whether there was one (N,) bool (False at an episode start).

        ``defer``: no stream samples before the next ``observe``, so a policy may postpone this step's
        work and do it together with later steps' (the causal policies then encode the buffered steps
        in one encoder call; ``sample`` always sees every observed step)."""

    @abstractmethod
    def sample(
        self,
        state: StreamState,
        rows: Tensor,
        *,
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """The action chunks (R, H, Da) in raw units of the streams ``rows`` (R,) (CPU indices) at their
        last observed step; ``noise`` (R, H, Da) or ``generator`` as in ``predict_chunk``. ``prefix``
        (R, P, Da) raw: the chunk's first P actions from the current tick on are given (actions already
        committed), and the rest is sampled consistent with them (``diffusion.sample``'s inpainting)."""

    def observe_many(
        self,
        states: Sequence[StreamState],
        obs: Mapping[str, Tensor],
        prev_action: Tensor,
        prev_valid: Tensor,
        *,
        defer: bool = False,
    ) -> None:
        """``observe`` for R separate single-stream states at once: row i of obs[key] (R, *shape),
        prev_action (R, Da) and prev_valid (R,) is states[i]'s step. Each state ends exactly as its own
        ``observe`` (with ``defer``) would leave it, up to floating-point summation order where the
        policy batches. Default: one ``observe`` per state."""
        for row, state in enumerate(states):
            self.observe(
                state,
                {key: value[row : row + 1] for key, value in obs.items()},
                prev_action[row : row + 1],
                prev_valid[row : row + 1],
                defer=defer,
            )

    def sample_many(
        self,
        states: Sequence[StreamState],
        *,
        noise: Tensor,
        num_inference_steps: int | None = None,
        prefix: Tensor | None = None,
    ) -> Tensor:
        """``sample`` for R separate single-stream states at once, from the start noise (R, H, Da)
        (row i for states[i]); returns (R, H, Da) raw. Default: one ``sample`` per state."""
        first = torch.zeros(1, dtype=torch.long)
        return torch.cat(
            [
                self.sample(
                    state,
                    first,
                    num_inference_steps=num_inference_steps,
                    noise=noise[row : row + 1],
                    prefix=None if prefix is None else prefix[row : row + 1],
                )
                for row, state in enumerate(states)
            ]
        )

    def normalized_prefix(self, prefix: Tensor | None) -> Tensor | None:
        """A raw action prefix in the space the denoiser samples in."""
        return None if prefix is None else self.normalizer.normalize(ACTION_KEY, prefix.to(self._dtype()))

    @abstractmethod
    def compile_denoiser(self) -> None:
        """``torch.compile`` the network the K-step sampling loop calls, in place (weights, state_dict
        and results unchanged); CUDA graphs (``mode="reduce-overhead"``) on CUDA."""

    def own_state(self, state: StreamState, kind: type[StateT]) -> StateT:
        """``state`` as the ``kind`` this policy's ``init_state`` makes (another policy's is refused)."""
        if not isinstance(state, kind):
            raise TypeError(f"{type(self).__name__} streams need the state from its init_state()")
        return state

    def _compile_mode(self) -> str | None:
        return "reduce-overhead" if self._device().type == "cuda" else None

    def decoder_parameter_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes trained at ``lr * decoder_lr_scale`` (none for monolithic models)."""
        return ()

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay only on linear/conv weight matrices (not on norms'
        gains, biases, embeddings, query slots or modulation tables); decoder groups at a scaled lr."""
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear | nn.Conv2d)}
        prefixes = self.decoder_parameter_prefixes()
        buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            key = (bool(prefixes) and name.startswith(prefixes), id(param) in decayed)
            buckets.setdefault(key, []).append(param)
        groups = []
        for (is_decoder, decay), params in sorted(buckets.items()):
            groups.append(
                {
                    "name": f"{'decoder' if is_decoder else 'encoder'}_{'decay' if decay else 'no_decay'}",
                    "params": params,
                    "lr": lr * self.config.decoder_lr_scale if is_decoder else lr,
                    "weight_decay": weight_decay if decay else 0.0,
                }
            )
        return groups

    # ------------------------------------------------------------------ shared input handling

    def normalize_obs(self, obs: Mapping[str, Tensor], lead: Sequence[int], where: str) -> dict[str, Tensor]:
        """Check every observation key has shape (*lead, *shape) and normalise it (new tensors)."""
        out = {}
        for key in self.obs_keys:
            if key not in obs:
                raise KeyError(f"{where}: observation key {key!r} is missing; got keys {sorted(obs)}")
            expected = (*lead, *self.config.input_shapes[key])
            if tuple(obs[key].shape) != tuple(expected):
                raise ValueError(f"{where}: {key!r} has shape {tuple(obs[key].shape)}; expected {expected}")
            out[key] = self.normalizer.normalize(key, obs[key].to(self._dtype()))
        return out

    def check_tensor(self, batch: Mapping[str, Tensor], key: str, shape: Sequence[int], where: str) -> Tensor:
        if key not in batch:
            raise KeyError(f"{where}: key {key!r} is missing; got keys {sorted(batch)}")
        value = batch[key]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)}; expected {tuple(shape)}")
        return value

    def history_noise(self, x: Tensor) -> Tensor:
        """Training-time Gaussian noise on normalised history inputs (``config.history_noise``)."""
        if not self.training or self.config.history_noise <= 0:
            return x
        return x + self.config.history_noise * torch.randn_like(x)

    def _dtype(self) -> torch.dtype:
        return self._placement()[1]

    def _device(self) -> torch.device:
        return self._placement()[0]

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        # Asked several times per control tick: walking the module tree each time (parameters()) was
        # measurable at the small presets. ``_apply`` (to / cuda / float / half) forgets it.
        placement: tuple[torch.device, torch.dtype] | None = self.__dict__.get("_placement_cache")
        if placement is None:
            first = next(self.parameters())
            placement = self.__dict__["_placement_cache"] = (first.device, first.dtype)
        return placement

    def _apply(self, fn: Any, recurse: bool = True) -> Policy:
        self.__dict__.pop("_placement_cache", None)
        applied: Policy = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return applied

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` then ``config.json`` (each atomically) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        weights = safetensors.torch.save(tensors)
        atomic_write_bytes(directory / WEIGHTS_FILE, weights)
        record = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "policy_type": self.policy_type,
            # Checked on load: a damaged or swapped weights file is refused instead of run.
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            "config": dataclasses.asdict(self.config),
            "normalizer": {
                "shapes": {key: list(shape) for key, shape in self.normalizer.shapes.items()},
                "modes": dict(self.normalizer.modes),
            },
        }
        # config.json last: a folder with a readable config.json holds complete weights.
        atomic_write_text(directory / CONFIG_FILE, json.dumps(record, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> Policy:
        """Load a folder written by ``save_pretrained``; returns the policy in eval mode on ``device``.

        Called on ``Policy`` itself it builds whatever type the folder holds; called on a subclass it
        refuses a folder of another type.
        """
        directory = Path(directory)
        record = read_policy_record(directory)
        stored_type = record["policy_type"]
        if cls is not Policy and stored_type != cls.policy_type:
            raise CheckpointError(
                f"{directory} holds a {stored_type!r} policy; {cls.__name__}.from_pretrained loads only "
                f"{cls.policy_type!r} (use scd_policy.policies.load_policy to load any type)"
            )
        try:
            config = policy_config_from_dict(record["config"])
            normalizer = Normalizer(record["normalizer"]["shapes"], record["normalizer"]["modes"])
        except (ConfigError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{directory / CONFIG_FILE} has an invalid config: {error}") from error
        if config.type != stored_type:
            raise CheckpointError(
                f"{directory / CONFIG_FILE}: policy_type {stored_type!r} but config.type {config.type!r}"
            )
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file():
            raise CheckpointError(f"{weights_path} is missing; the policy folder is incomplete")
        expected_sha = record.get("weights_sha256")  # absent in folders written before checksums
        if expected_sha is not None and sha256_file(weights_path) != expected_sha:
            raise CheckpointError(
                f"{weights_path} does not match the checksum in {directory / CONFIG_FILE}: the weights "
                "file is damaged (truncated or changed); restore it or re-export the policy"
            )
        cls_ = policy_class(stored_type)
        _check_weight_shapes(cls_, config, normalizer, weights_path)
        policy = cls_(config, normalizer)
        try:
            tensors = safetensors.torch.load_file(str(weights_path), device="cpu")
        except Exception as error:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {error}") from error
        try:
            policy.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"{weights_path} does not match the {stored_type!r} policy: {error}"
            ) from error
        return policy.to(device).eval()


def _check_weight_shapes(
    cls: type[Policy], config: PolicyConfig, normalizer: Normalizer, weights_path: Path
) -> None:
    """Compare the network ``config`` describes with the weights file's header before allocating it.

    The network is built on the meta device (no memory), so an edited config.json (say d_model=65536)
    is refused at once instead of after allocating gigabytes.
    """
    try:
        with safetensors.safe_open(str(weights_path), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {error}") from None
    with torch.device("meta"):
        skeleton = cls(config, normalizer)
    wanted = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    problems = [f"missing {key}" for key in sorted(set(wanted) - set(stored))]
    problems += [f"unexpected {key}" for key in sorted(set(stored) - set(wanted))]
    problems += [
        f"{key}: file {list(stored[key])}, config {list(shape)}"
        for key, shape in sorted(wanted.items())
        if key in stored and stored[key] != shape
    ]
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match the network its config.json describes ({len(problems)} "
            f"tensors differ, e.g. {'; '.join(problems[:3])}); was config.json edited? Restore it, or "
            "re-export the policy"
        )


def read_policy_record(directory: Path) -> dict[str, Any]:
    """Read and check ``config.json`` of a policy folder (format, version, type present)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a policy folder (no such directory)")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; expected a folder written by Policy.save_pretrained")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an {FORMAT_NAME} policy config (missing format={FORMAT_NAME!r})"
        )
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this scd-policy reads version {FORMAT_VERSION}"
        )
    for key in ("policy_type", "config", "normalizer"):
        if key not in record:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    return record


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the elements where ``mask`` (prediction.shape[:-1]) is True."""
    weight = mask.to(prediction.dtype).unsqueeze(-1)
    total = ((prediction - target) ** 2 * weight).sum()
    count = weight.sum() * prediction.shape[-1]
    return total / count.clamp(min=1.0)
