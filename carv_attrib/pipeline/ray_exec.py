"""Run a stage's parts as Ray tasks (`--executor ray`): the engine when one machine is not enough.

The unit of work is what `--shard I/N` already does on one machine: part I of N takes the clips whose
id is I mod N and appends shards numbered I mod N (`carv_attrib.store.shards.ShardStore.part_shards`),
with the same atomic write and done-marker protocol. So a Ray run, a local run and a Ray run that was
killed and resumed hold the same rows, and a task whose worker died is simply run again by Ray
(`max_retries`): its finished shards are kept, its unfinished one is redone, and no clip is written
twice into the live view (`carv_attrib.store.live`). Ray Core tasks, not Ray Data: the parts are a few
long jobs that write their own files, not a stream of records.

    results = run_parts(run_encode, [replace(cfg, shard=f"{i}/{n}") for i in range(n)], address="local")
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from carv_attrib.errors import UsageError

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # worker deaths (OOM kill, preemption) a part survives
# Tests set this to a marker-file path: the first part to finish a shard then dies (os._exit, as an OOM
# kill would), once, so that Ray's retry of a dead worker is exercised for real.
DIE_ONCE_ENV = "CARV_ATTRIB_TEST_DIE_ONCE"


def _run_part(fn: Callable[..., Any], config: Any) -> Any:
    marker = os.environ.get(DIE_ONCE_ENV)
    if not marker:
        return fn(config)

    def die_once(event: str, info: dict[str, Any]) -> None:
        if event == "shard":
            try:
                with open(marker, "x"):
                    pass
            except FileExistsError:
                return
            os._exit(1)

    return fn(config, die_once)


def require_ray() -> Any:
    try:
        import ray  # optional dependency ([ray] extra): imported where it is needed
    except ImportError:
        raise UsageError(
            "--executor ray needs Ray: pip install 'carv-attrib[ray]' (or use --shard I/N per worker)"
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """A HOST:PORT that does not answer is refused in seconds, before Ray's own long retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
            "`ray start --head`, or use --ray-address local"
        ) from None


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Connected Ray: `auto` (a running cluster), `local` (started here, shut down after) or
    HOST:PORT. Default: $RAY_ADDRESS, else local. UsageError (exit 2) when it cannot connect."""
    ray = require_ray()
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    started_here = not ray.is_initialized()
    if started_here:
        if address not in ("auto", "local"):
            _check_reachable(address)
        try:
            if address == "local":
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as exc:
            raise UsageError(f"--ray-address {address}: cannot connect to Ray ({exc})") from None
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def default_parts(ray: Any) -> int:
    """One part per GPU of the cluster; without GPUs one per node (a part loads the VAE and UMT5,
    ~22 GB at float32 for Wan2.1, and uses the node's cores itself: one per CPU would not fit)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return max(1, gpus or sum(1 for node in ray.nodes() if node.get("Alive")))


def run_parts(
    fn: Callable[[Any], Any],
    configs: Sequence[Any],
    ray: Any,
    on_done: Callable[[int, Any], None] | None = None,
    use_gpu: bool = True,
) -> list[Any]:
    """fn(config) for each config as a Ray task (1 CPU, and with `use_gpu` 1 GPU each when the
    cluster has GPUs: encode and featurize parts; CPU work such as filling index parts passes False,
    so it is not limited to, or kept waiting for, the cluster's GPUs), retried up to MAX_RETRIES times
    when its worker dies; results in config order. An error raised by fn (a UsageError, say) is
    re-raised here as itself, and the parts still pending are cancelled."""
    gpus = 1 if use_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES)(_run_part)
    if os.environ.get(DIE_ONCE_ENV):  # a test's: workers started before it was set must see it
        task = task.options(runtime_env={"env_vars": {DIE_ONCE_ENV: os.environ[DIE_ONCE_ENV]}})
    refs = [task.remote(fn, c) for c in configs]
    index = {r: i for i, r in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        i = index[done[0]]
        try:
            results[i] = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # a part's own error: raised as itself, one line
            for r in pending:  # the others would go on writing files the failed command abandons
                ray.cancel(r)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        if on_done is not None:
            on_done(i, results[i])
    return results
