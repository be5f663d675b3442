"""``gms segment --cluster ray[://HOST:PORT]``: a batch spread over Ray actors, each holding one loaded model.

No scheduler of our own: Ray places the actors (``num_gpus=1`` each where the model runs on CUDA, else
``--threads`` CPUs each) and runs them; this module only hands out the items and writes the results.

- **The driver reads and writes, the actors compute.** The driver reads each input (the same checks as on one
  machine), sends its voxels to an idle actor through Ray's object store, and writes the labels that come back
  (atomically, never replacing a file without ``--overwrite``, DICOM SEG or label map, uncertainty map), so a cluster
  needs no shared disk. The model folder travels to the actors the same way (its card and weights, a few MB); the
  foundation weights are resolved on each node as anywhere (``GMS_WEIGHTS_DIR``, the cache, a pinned download).
  What travels per item is its voxels as float32 and its labels as uint8 (a 512x512x300 volume: 300 MB and 75 MB);
  Ray's object store holds one item per actor at a time (an actor gets its next item once it has answered).
- **The same rules as one machine**: the outputs are checked before any actor starts, a failing item does not stop
  the others, the same JSON events and result lines, exit code 2 when any item failed.
- **Faults**: an actor that dies during an item (its process killed, its node lost) is replaced and the item is
  retried once on another actor; a second loss fails that item. Ctrl-C / SIGTERM on the driver ends every actor
  (and the local Ray instance it started); nothing partial is written.

``--cluster ray`` starts a local Ray instance in this process (the machine's CPUs); ``--cluster ray://HOST:PORT``
connects to a running cluster through the Ray client (the engine's code is shipped with ``runtime_env``).
"""
from __future__ import annotations

import collections
import os
import time
from pathlib import Path

from . import GMSError

RETRIES = 1  # an item whose actor died is retried this many times, on another actor


def _ray():
    try:
        import ray
    except ImportError:
        raise GMSError("--cluster ray needs Ray: pip install 'gmssegment[ray]' (or pip install 'ray[client]')") from None
    return ray


def _address(cluster: str) -> str | None:
    """None for a local instance (``ray``), else the cluster's address (``ray://HOST:PORT``)."""
    if cluster == "ray":
        return None
    if cluster.startswith("ray://") and len(cluster) > len("ray://"):
        return cluster
    raise GMSError(f"--cluster takes 'ray' (a local Ray instance) or 'ray://HOST:PORT' (a running cluster), not "
                   f"{cluster!r}")


def _model_files(model_dir: Path) -> dict[str, bytes]:
    """The model folder's files (card, weights; a few MB), sent to the actors, which may not share our disk."""
    return {p.name: p.read_bytes() for p in sorted(model_dir.iterdir()) if p.is_file()}


class SegmentActor:
    """One loaded model on one Ray worker (made a Ray actor class in :func:`run_on_cluster`)."""

    def __init__(self, files: dict, weights_dir, device: str, options, threads: int | None):
        import tempfile

        import torch

        from .allocator import keep_freed_memory
        from .model import load_model
        from .pipeline import pick_device, segmenter_for

        keep_freed_memory()
        if threads:
            torch.set_num_threads(threads)
        folder = Path(tempfile.mkdtemp(prefix="gms-actor-model-"))
        for name, data in files.items():
            (folder / name).write_bytes(data)
        self.device = pick_device(device)
        self.model = load_model(folder, weights_dir=weights_dir, device=self.device)
        self.options = options
        self.segmenter = segmenter_for(self.model, options, self.device)

    def pid(self) -> int:
        return os.getpid()

    def segment(self, item: int, array, spacing_zyx, direction, with_map: bool):
        from .itemwork import compute

        marker = os.environ.get("GMS_ACTOR_STATUS_DIR")  # where each actor tells which item it runs (tests, ops)
        if marker:
            Path(marker, f"{os.getpid()}").write_text(str(item))
        t0 = time.perf_counter()
        labels, unc = compute(self.model, self.options, self.segmenter, array, spacing_zyx, direction, with_map)
        return {"labels": labels, "unc": unc, "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def run_on_cluster(jobs: list[dict], todo: list[int], args, rep, batch: bool) -> tuple[int, int]:
    """Segment the ``todo`` items of ``jobs`` on Ray actors; returns (segmented, failed)."""
    ray = _ray()
    address = _address(args.cluster)
    from .card import load_card
    from .imageio import read_image
    from .model import resolve_model_path
    from .options import InferenceOptions
    from .itemwork import check_png_labels, finish_item

    model_dir = Path(resolve_model_path(args.model))
    card = load_card(model_dir / "card.json")
    options = InferenceOptions.from_args(args)
    cuda = args.device in ("cuda", "gpu")
    threads = args.threads or 1
    started_here = False
    env = {k: v for k, v in os.environ.items() if k.startswith("GMS_")}
    if not ray.is_initialized():
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False, runtime_env={"env_vars": env})
            else:
                ray.init(address=address, log_to_driver=False, runtime_env={
                    "env_vars": env, "py_modules": [str(Path(__file__).resolve().parent)]})
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
            where = "start a local Ray instance" if address is None else f"connect to the Ray cluster {address}"
            raise GMSError(f"cannot {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        started_here = True
    resources = ray.cluster_resources()
    if cuda and not resources.get("GPU"):
        raise GMSError(f"--device cuda: the Ray cluster has no GPU ({args.cluster})")
    per_actor = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": threads}
    fits = int(resources.get("GPU", 0)) if cuda else int(resources.get("CPU", 1) // threads)
    n_actors = max(1, min(args.actors or fits or 1, len(todo)))
    rep.log(f"model {model_dir} on {n_actors} Ray actor(s) ({'1 GPU' if cuda else f'{threads} CPU(s)'} each) of "
            f"{'a local Ray instance' if address is None else address}")
    remote = ray.remote(max_restarts=0)(SegmentActor)
    files = ray.put(_model_files(model_dir))
    device = "cuda" if cuda else "cpu"

    def new_actor():
        return remote.options(**per_actor).remote(files, args.weights_dir, device, options, threads)

    actors = [new_actor() for _ in range(n_actors)]
    idle = collections.deque(actors)
    pending = collections.deque(todo)
    attempts: collections.Counter = collections.Counter()
    inflight: dict = {}  # object ref -> (item, actor, image, start time)
    n_ok = n_failed = 0

    def fail(i: int, message: str) -> None:
        nonlocal n_failed
        n_failed += 1
        rep.error(message, input=jobs[i]["input"], **({"item": i} if batch else {}))

    try:
        while pending or inflight:
            while idle and pending:
                i = pending.popleft()
                job = jobs[i]
                try:
                    check_png_labels(job, card)
                    img = read_image(job["input"], series_uid=job.get("series"))
                except GMSError as e:
                    fail(i, str(e))
                    continue
                actor = idle.popleft()
                if not attempts[i]:
                    rep.start(1, desc=Path(job["input"]).name, input=job["input"], **({"item": i} if batch else {}))
                ref = actor.segment.remote(i, img.array, img.geometry.spacing_zyx, img.geometry.direction,
                                           bool(job.get("uncertainty")))
                inflight[ref] = (i, actor, img, time.perf_counter())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                i, actor, img, t0 = inflight.pop(ref)
                extra = {"item": i} if batch else {}
                try:
                    out = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as e:
                    with_cause = type(e).__name__
                    replacement = new_actor()
                    actors[actors.index(actor)] = replacement
                    idle.append(replacement)
                    attempts[i] += 1
                    if attempts[i] <= RETRIES:
                        rep.log(f"{jobs[i]['input']}: its Ray worker was lost ({with_cause}); retrying on another")
                        pending.appendleft(i)
                    else:
                        fail(i, f"{jobs[i]['input']}: the Ray worker running it was lost {attempts[i]} times "
                                f"({with_cause})")
                    continue
                except ray.exceptions.RayTaskError as e:  # the item's own failure inside the actor
                    idle.append(actor)
                    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                    fail(i, str(cause) if isinstance(cause, GMSError) else f"unexpected {type(cause).__name__}: "
                         f"{cause}")
                    continue
                idle.append(actor)
                try:
                    rep.progress(1, 1, **extra)
                    finish_item(jobs[i], img, out["labels"], out["unc"], card, model_dir, args.overwrite, rep, t0,
                                extra)
                    n_ok += 1
                except GMSError as e:
                    fail(i, str(e))
    finally:
        for actor in actors:  # also on Ctrl-C / SIGTERM: nothing keeps running on the cluster
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        if started_here:
            ray.shutdown()
    return n_ok, n_failed
