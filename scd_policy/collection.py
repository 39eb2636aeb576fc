"""Recording scripted-expert demonstrations of a task into a zarr replay buffer (behind ``scd-collect``).

    scd-collect task=push_t episodes=100 out=datasets/push_t.zarr image=true workers=2

Episode attempt i of a run uses seed ``start + i`` for both the env reset and the expert, where
``start`` is ``seed`` for a new dataset and never less than the dataset's ``next_seed`` when
appending, so no seed is collected twice. Only successful episodes are kept. Results are consumed in
seed order, so the kept episodes (and their order) do not depend on the number of workers.

Each finished episode is written as it arrives (the buffer's append is atomic), so an interrupt
(Ctrl-C / SIGTERM) loses only the episodes still in flight; re-running the same command appends the
rest. The step-t observation stored is the one the expert acted on, paired with the action it took.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import importlib.metadata
import logging
import multiprocessing
import multiprocessing.pool
import signal
import sys
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm import tqdm

import scd_policy
from envs.external import ExternalTaskError
from envs.registry import TaskSpec, get_task, import_task_modules, make_env, make_expert
from scd_policy.config import ConfigError
from scd_policy.errors import debug_requested, describe_os_error

if TYPE_CHECKING:
    # Imported where used: workers re-import this module, and scd_policy.data pulls in torch (~1 s).
    from scd_policy.data.replay_buffer import ReplayBuffer

log = logging.getLogger("scd_policy.collect")

EXIT_INCOMPLETE = 1  # the attempt budget ran out before enough successful episodes
EXIT_USAGE = 2  # bad configuration or an incompatible dataset
EXIT_INTERRUPTED = 130  # the shell convention for "stopped by SIGINT"

_VERSIONED_PACKAGES = ("mujoco", "gymnasium", "metaworld", "numpy", "zarr")


class CollectError(ValueError):
    """The requested collection cannot run (e.g. an existing dataset with another task or shapes)."""


@dataclass
class CollectConfig:
    """Options of ``scd-collect`` (the schema behind configs/collect.yaml)."""

    # A registered task name (envs.registry.task_names()), gym:<gymnasium id> or <module>:<factory>
    # (docs/tasks.md).
    task: str = MISSING
    episodes: int = 50  # successful episodes to add
    out: str = MISSING  # the replay buffer (.zarr directory); appended to when it exists
    image: bool = False  # also record camera images
    camera: str | None = None  # None: the task's default camera
    # More cameras, each recorded as its own key image_<camera> (e.g. [top, side]; image=true is not
    # needed for them).
    cameras: list[str] = field(default_factory=list)
    image_size: int = 96  # square image side in pixels
    seed: int = 0  # first seed of a new dataset
    workers: int = 2  # parallel worker processes (0: run in this process)
    max_attempts: int | None = None  # episodes to try at most; None: max(2 * episodes, episodes + 10)
    max_episode_steps: int | None = None  # None: the task's own limit
    overwrite: bool = False  # replace an existing dataset instead of appending
    # Std of Gaussian noise added to the *executed* action (action units); the stored action stays the
    # expert's clean one (DART-style noise injection). The demonstrations then visit states just off the
    # expert's own paths, labelled with the expert's correction, which is what a policy needs to recover
    # from its own small errors. 0: execute the expert's actions as they are.
    exec_noise: float = 0.0
    # <module>:<factory> with factory(seed) -> expert(obs, info) -> action in [-1, 1]; None: the task's own.
    expert: str | None = None
    task_module: str | None = None  # a module to import first that registers tasks (register_task)
    # Keep only the episodes the expert succeeded in; false keeps every episode (e.g. for an env that
    # reports no success, or to record failures on purpose).
    only_successes: bool = True

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ConfigError(f"episodes={self.episodes}; expected >= 1")
        if self.image_size < 8:
            raise ConfigError(f"image_size={self.image_size}; expected >= 8 pixels")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}; expected >= 0")
        if self.workers < 0:
            raise ConfigError(f"workers={self.workers}; expected >= 0 (0 runs episodes in this process)")
        if self.max_attempts is not None and self.max_attempts < self.episodes:
            raise ConfigError(f"max_attempts={self.max_attempts} is below episodes={self.episodes}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"max_episode_steps={self.max_episode_steps}; expected >= 1")
        if not 0.0 <= self.exec_noise < 1.0:
            raise ConfigError(f"exec_noise={self.exec_noise}; expected in [0, 1)")

    @property
    def attempt_budget(self) -> int:
        return (
            self.max_attempts if self.max_attempts is not None else max(2 * self.episodes, self.episodes + 10)
        )


@dataclass
class CollectReport:
    """What one ``collect`` call did."""

    path: Path
    saved: int  # successful episodes added by this call
    attempts: int  # episodes run to completion and judged by this call
    total_episodes: int  # episodes in the dataset afterwards
    next_seed: int  # where the next call continues
    interrupted: bool = False

    @property
    def success_rate(self) -> float:
        return self.saved / self.attempts if self.attempts else 0.0


# ---- episodes (run in worker processes or in this one) ---------------------------------------
@dataclass(frozen=True)
class EnvOptions:
    task: str
    image: bool
    camera: str
    image_size: int
    max_episode_steps: int
    exec_noise: float = 0.0
    cameras: tuple[str, ...] = ()  # further cameras, recorded as image_<camera>
    expert: str | None = None  # <module>:<factory> replacing the task's own expert
    task_module: str | None = None  # the module that registers the task (recorded in the card)


@dataclass
class Episode:
    seed: int
    success: bool
    # Per observation key (T, ...) as the env returns it (state (T, Ds) float32, image (T, H, W, 3)
    # uint8 for the built-in tasks) and action (T, Da) float32.
    data: dict[str, np.ndarray]


class EpisodeRunner:
    """One env of a task; runs the task's expert for one seeded episode at a time."""

    def __init__(self, options: EnvOptions) -> None:
        self.options = options
        self.env = make_env(
            options.task,
            image=options.image,
            camera=options.camera,
            image_size=options.image_size,
            max_episode_steps=options.max_episode_steps,
            cameras=camera_keys(options),
        )

    def run(self, seed: int) -> Episode:
        expert = make_expert(self.options.task, seed, self.options.expert)
        obs, info = self.env.reset(seed=seed)
        # Its own stream, so the env and expert streams of a seed are the same with or without noise.
        noise = np.random.default_rng([seed, 0x5EED])
        frames: dict[str, list[np.ndarray]] = {key: [] for key in (*obs, "action")}
        while True:
            action = np.clip(np.asarray(expert(obs, info), dtype=np.float32), -1.0, 1.0)
            # Store the observation the expert acted on next to the action it took.
            for key, value in obs.items():
                frames[key].append(value)
            frames["action"].append(action)
            executed = action
            if self.options.exec_noise > 0.0:
                executed = action + noise.normal(0.0, self.options.exec_noise, action.shape).astype(
                    np.float32
                )
            obs, _, terminated, truncated, info = self.env.step(np.clip(executed, -1.0, 1.0))
            if terminated or truncated:
                break
        data = {key: np.stack(values) for key, values in frames.items()}
        return Episode(seed=seed, success=bool(info["success"]), data=data)

    def close(self) -> None:
        self.env.close()


_WORKER_RUNNER: EpisodeRunner | None = None


def _init_worker(options: EnvOptions) -> None:
    global _WORKER_RUNNER
    # Ctrl-C reaches the whole process group; the main process decides how to stop the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_RUNNER = EpisodeRunner(options)


def _run_in_worker(seed: int) -> Episode:
    assert _WORKER_RUNNER is not None, "worker used before _init_worker"
    try:
        return _WORKER_RUNNER.run(seed)
    except Exception as exc:
        # Only the message survives pickling back to the main process: say which episode failed.
        raise RuntimeError(
            f"episode with seed {seed} of task {_WORKER_RUNNER.options.task!r} failed: {exc!r}"
        ) from exc


# ---- the dataset card --------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"scd_policy": scd_policy.__version__}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def camera_keys(options: EnvOptions) -> dict[str, str]:
    """The further cameras' observation keys: image_<camera> -> camera."""
    return {f"image_{camera}": camera for camera in options.cameras}


def expected_shapes(spec: TaskSpec, options: EnvOptions) -> dict[str, list[int]]:
    shapes = {key: list(shape) for key, shape in spec.observation_keys.items()}
    shapes["action"] = [spec.action_dim]
    for key in [*(["image"] if options.image else []), *camera_keys(options)]:
        shapes[key] = [options.image_size, options.image_size, 3]
    return shapes


def _new_card(spec: TaskSpec, options: EnvOptions) -> dict[str, Any]:
    return {
        "task": spec.name,
        "task_tags": list(spec.tags),
        "success_criterion": spec.success,
        "expert": options.expert or spec.expert_entry_point,
        "task_module": options.task_module,
        "image": options.image,
        "camera": options.camera if options.image else None,
        "cameras": camera_keys(options),
        "image_size": options.image_size if options.image or options.cameras else None,
        "max_episode_steps": options.max_episode_steps,
        "exec_noise": options.exec_noise,
        "episode_seeds": [],  # the seed of every stored episode, in storage order
        "next_seed": 0,  # the first seed not yet tried; appends start here
        "attempts": 0,  # episodes tried over all runs (kept or not)
        "successes": 0,
        "expert_success_rate": None,
        "versions": package_versions(),
        "created": _now(),
        "updated": _now(),
        "runs": [],
    }


def _check_compatible(buffer: ReplayBuffer, spec: TaskSpec, options: EnvOptions) -> dict[str, Any]:
    """The existing card, after checking the dataset can take episodes of this collection."""
    meta = buffer.meta
    where = f"the dataset at {buffer.path}"
    if meta.get("task") != spec.name:
        raise CollectError(
            f"{where} holds task {meta.get('task')!r}, not {spec.name!r}; choose another out=<path> "
            "(or overwrite=true to replace it)"
        )
    card = meta.get("card")
    if not isinstance(card, dict) or "next_seed" not in card:
        raise CollectError(
            f"{where} has no scd-collect dataset card (meta.card.next_seed); it was not made here"
        )
    wanted = expected_shapes(spec, options)
    if buffer.n_episodes > 0:
        stored = {key: list(shape) for key, shape in buffer.shapes.items()}
        if stored != wanted:
            raise CollectError(
                f"{where} stores keys/shapes {stored} but this run would write {wanted}; "
                "match its image/image_size options or write to another out=<path>"
            )
    if options.image and card.get("camera") not in (None, options.camera):
        raise CollectError(
            f"{where} was recorded with camera={card.get('camera')!r}, not {options.camera!r}; "
            "images from different cameras do not belong in one dataset"
        )
    if card.get("max_episode_steps") != options.max_episode_steps:
        log.warning(
            "%s was recorded with max_episode_steps=%s; this run uses %s",
            where,
            card.get("max_episode_steps"),
            options.max_episode_steps,
        )
    seeds = list(card.get("episode_seeds", []))
    if len(seeds) > buffer.n_episodes:
        # The card is written before each append: an append cut off by a crash leaves its seed here.
        # Drop it (the seed stays used: next_seed already moved past it, so it is never repeated).
        card["episode_seeds"] = seeds[: buffer.n_episodes]
    elif len(seeds) < buffer.n_episodes:
        log.warning("%s holds %d episodes but its card lists %d seeds", where, buffer.n_episodes, len(seeds))
    card["image"] = options.image
    card["camera"] = options.camera if options.image else None
    card["image_size"] = options.image_size if options.image or options.cameras else None
    card["cameras"] = camera_keys(options)
    return card


def open_dataset(
    cfg: CollectConfig, spec: TaskSpec, options: EnvOptions
) -> tuple[ReplayBuffer, dict[str, Any]]:
    """Create the buffer (with a fresh card) or open it for appending (checking it fits)."""
    from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer

    path = Path(cfg.out)
    if path.exists() and not cfg.overwrite:
        try:
            buffer = ReplayBuffer.open(path, mode="a")
        except DatasetError as exc:
            raise CollectError(f"cannot append to {path}: {exc}") from exc
        return buffer, _check_compatible(buffer, spec, options)
    card = _new_card(spec, options)
    card["next_seed"] = cfg.seed
    buffer = ReplayBuffer.create(
        path, meta={"fps": spec.fps, "source": "scd-collect", "task": spec.name, "card": card}, overwrite=True
    )
    return buffer, card


# ---- the collection loop -----------------------------------------------------------------------
class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between episodes; a second one stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def _episodes_in_process(options: EnvOptions, seeds: range, stop: _StopRequest) -> Iterator[Episode]:
    runner = EpisodeRunner(options)
    try:
        for seed in seeds:
            if stop.signum is not None:
                return
            yield runner.run(seed)
    finally:
        runner.close()


def _episodes_in_pool(
    pool: multiprocessing.pool.Pool, seeds: range, stop: _StopRequest, in_flight: int
) -> Iterator[Episode]:
    """Episodes in seed order, with at most ``in_flight`` submitted ahead. Bounded, so that the pool can
    be closed and joined once enough episodes are saved (waiting for a few short episodes) instead of
    terminated with a queue full of work: ``Pool.terminate`` can deadlock on its queues' locks, which
    hung a collection after its last episode under load."""
    remaining = iter(seeds)
    pending: collections.deque[multiprocessing.pool.AsyncResult[Episode]] = collections.deque()

    def submit() -> None:
        seed = next(remaining, None)
        if seed is not None:
            pending.append(pool.apply_async(_run_in_worker, (seed,)))

    for _ in range(in_flight):
        submit()
    while pending and stop.signum is None:
        try:
            episode = pending[0].get(timeout=0.2)  # a short timeout notices a stop request while waiting
        except multiprocessing.TimeoutError:
            continue
        pending.popleft()
        submit()
        yield episode


@contextlib.contextmanager
def _signals_request_stop(stop: _StopRequest) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``stop`` while collecting (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def collect(cfg: CollectConfig, *, progress: bool = True) -> CollectReport:
    """Run the task's expert and append its successful episodes to ``cfg.out``.

    With ``cfg.workers > 0`` the episodes run in "spawn" worker processes, which re-import the
    calling script: call this from under ``if __name__ == "__main__":`` in a script of your own.
    """
    try:
        import_task_modules([cfg.task_module] if cfg.task_module else [])
        spec = get_task(cfg.task)
        if cfg.expert is None and not spec.expert_entry_point:
            make_expert(spec.name)  # raises the "no scripted expert; pass expert=..." message
        if cfg.expert is not None:
            make_expert(spec.name, 0, cfg.expert)  # a bad path fails here, not in every worker
    except KeyError as exc:
        raise CollectError(str(exc.args[0])) from exc
    except ExternalTaskError as exc:
        raise CollectError(str(exc)) from exc
    camera = cfg.camera or (spec.cameras[0] if spec.cameras else "")
    for wanted in [*([camera] if cfg.image or cfg.camera else []), *cfg.cameras]:
        if wanted not in spec.cameras:
            raise CollectError(
                f"task {spec.name!r} has no camera {wanted!r}; available: {list(spec.cameras)}"
                if spec.cameras
                else f"task {spec.name!r} cannot render images (its env has no rgb_array render mode); "
                "collect without image=true and cameras="
            )
    options = EnvOptions(
        task=spec.name,
        image=cfg.image,
        camera=camera,
        image_size=cfg.image_size,
        max_episode_steps=cfg.max_episode_steps or spec.max_episode_steps,
        exec_noise=cfg.exec_noise,
        expert=cfg.expert,
        task_module=cfg.task_module,
        cameras=tuple(dict.fromkeys(cfg.cameras)),
    )
    stop = _StopRequest()
    with _signals_request_stop(stop):
        buffer, card = open_dataset(cfg, spec, options)
        return _collect_into(buffer, card, cfg, options, stop, progress)


def collect_up_to(cfg: CollectConfig, total: int, *, progress: bool = True) -> int:
    """Make ``cfg.out`` hold at least ``total`` episodes, collecting only the missing ones (an existing
    buffer must fit the task and observation settings); returns the number of episodes it holds."""
    from scd_policy.data.replay_buffer import DatasetError, ReplayBuffer

    path = Path(cfg.out)
    try:
        have = ReplayBuffer.open(path).n_episodes if path.exists() and not cfg.overwrite else 0
    except DatasetError as exc:
        raise CollectError(f"cannot top up {path}: {exc}") from exc
    if have >= total:
        log.info("reusing %d demonstrations of %s in %s", have, cfg.task, path)
        return have
    log.info("collecting %d expert demonstrations of %s -> %s", total - have, cfg.task, path)
    report = collect(dataclasses.replace(cfg, episodes=total - have), progress=progress)
    return report.total_episodes


def _collect_into(
    buffer: ReplayBuffer,
    card: dict[str, Any],
    cfg: CollectConfig,
    options: EnvOptions,
    stop: _StopRequest,
    progress: bool,
) -> CollectReport:
    start = max(cfg.seed, int(card["next_seed"]))
    seeds = range(start, start + cfg.attempt_budget)
    run_record: dict[str, Any] = {
        "started": _now(),
        "first_seed": start,
        "attempts": 0,
        "saved": 0,
        "workers": cfg.workers,
        "versions": package_versions(),
    }
    card["runs"] = [*card.get("runs", []), run_record]

    pool: multiprocessing.pool.Pool | None = None
    episodes: Iterator[Episode] | None = None
    saved = attempts = 0
    bar = tqdm(
        total=cfg.episodes, desc=f"collect {options.task}", unit="ep", disable=not progress, file=sys.stderr
    )
    try:
        if cfg.workers > 0:
            context = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited GL state
            pool = context.Pool(cfg.workers, initializer=_init_worker, initargs=(options,))
            episodes = _episodes_in_pool(pool, seeds, stop, in_flight=2 * cfg.workers)
        else:
            episodes = _episodes_in_process(options, seeds, stop)
        for episode in episodes:
            attempts += 1
            card["attempts"] = int(card.get("attempts", 0)) + 1
            card["successes"] = int(card.get("successes", 0)) + int(episode.success)
            card["expert_success_rate"] = card["successes"] / card["attempts"]
            card["next_seed"] = episode.seed + 1
            card["updated"] = _now()
            keep = episode.success or not cfg.only_successes
            run_record.update(attempts=attempts, saved=saved + int(keep))
            if keep:
                card["episode_seeds"] = [*card["episode_seeds"], episode.seed]
            # Card first, data second: a crash in between drops the episode but never reuses its seed.
            buffer.update_meta(card=card)
            if keep:
                buffer.append_episode(episode.data)
                saved += 1
                bar.update(1)
            bar.set_postfix(success=f"{saved / attempts:.0%}", tried=attempts)
            if saved == cfg.episodes:
                break
    except KeyboardInterrupt:  # a second Ctrl-C: stop without waiting for the current step
        stop.signum = stop.signum or int(signal.SIGINT)
        if pool is not None:
            pool.terminate()  # the episodes still running are not worth waiting for now
    finally:
        bar.close()
        if isinstance(episodes, Generator):
            episodes.close()  # runs the generator's cleanup (closes the in-process env)
        if pool is not None:
            # The episodes still in flight are discarded (their seeds were not recorded, so a re-run
            # redoes them); there are at most 2 x workers of them, each a few seconds at most.
            pool.close()
            pool.join()
    interrupted = stop.signum is not None and saved < cfg.episodes
    run_record["interrupted"] = interrupted
    buffer.update_meta(card=card)
    return CollectReport(
        path=Path(cfg.out),
        saved=saved,
        attempts=attempts,
        total_episodes=buffer.n_episodes,
        next_seed=int(card["next_seed"]),
        interrupted=interrupted,
    )


# ---- what the command line reports -----------------------------------------------------------------
def run_collection(cfg: CollectConfig, *, progress: bool = True) -> int:
    """``collect`` plus the user-facing summary; returns the process exit code."""
    from scd_policy.data.replay_buffer import DatasetError

    try:
        report = collect(cfg, progress=progress)
    except (CollectError, DatasetError) as exc:
        log.error("scd-collect: error: %s", exc)
        return EXIT_USAGE
    except OSError as exc:
        message = describe_os_error(exc)
        if message is None or debug_requested():
            raise
        log.error(
            "scd-collect: error: %s. Every episode saved before is intact in %s; free space and re-run the "
            "same command to continue",
            message,
            cfg.out,
        )
        return EXIT_USAGE
    rate = f"{report.success_rate:.0%}" if report.attempts else "n/a"
    if report.interrupted:
        log.warning(
            "Interrupted: %d episodes saved to %s in this run (%d in total); episodes in flight were "
            "dropped. Re-run the same command to continue: it appends, starting at seed %d.",
            report.saved,
            report.path,
            report.total_episodes,
            report.next_seed,
        )
        return EXIT_INTERRUPTED
    if report.saved < cfg.episodes:
        log.error(
            "Only %d of %d episodes succeeded within max_attempts=%d (expert success %s); they are saved in "
            "%s. Re-run to append more, or raise max_attempts.%s",
            report.saved,
            cfg.episodes,
            cfg.attempt_budget,
            rate,
            report.path,
            " An env that reports no success (info['success'] / info['is_success']) never succeeds: "
            "only_successes=false keeps every episode"
            if report.saved == 0
            else "",
        )
        return EXIT_INCOMPLETE
    log.info(
        "Saved %d episodes of %s to %s (%d in total); expert success %s over %d attempts; next seed %d.",
        report.saved,
        cfg.task,
        report.path,
        report.total_episodes,
        rate,
        report.attempts,
        report.next_seed,
    )
    return 0


def config_from_dict(values: DictConfig | dict[str, Any]) -> CollectConfig:
    """A composed config (or plain overrides) -> the validated dataclass (runs ``__post_init__``)."""
    merged = OmegaConf.merge(OmegaConf.structured(CollectConfig), values)
    missing = sorted(key for key in ("task", "out") if OmegaConf.is_missing(merged, key))
    if missing:
        raise ConfigError(
            f"missing required option(s) {', '.join(f'{key}=...' for key in missing)}; "
            "e.g. scd-collect task=push_t episodes=10 out=datasets/push_t.zarr (see scd-collect --help)"
        )
    config = OmegaConf.to_object(merged)
    assert isinstance(config, CollectConfig)
    return config
