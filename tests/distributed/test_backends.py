"""The serial and Ray backends on a real (multi-node, local) Ray cluster."""

from __future__ import annotations

import pytest
import torch

from deltagrad_ray import api
from deltagrad_ray.core import ChangeSet, Dataset, InputError, leave_one_out, make_change_set
from deltagrad_ray.core import synthetic_classification
from deltagrad_ray.distributed.backends import RayBackend, SerialBackend
from deltagrad_ray.store.parts import ResultSink
from deltagrad_ray.store import write_dataset

from ..processes import assert_same_across_processes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray")
    data = synthetic_classification(600, 10, 3, seed=0)
    write_dataset(data, d / "data.parquet")
    cache = api.fit(str(d / "data.parquet"), str(d / "cache"), model="logreg", steps=60, lr=0.5, l2=0.01,
                    shard_steps=15)  # 4 shards: a pipeline of 2 actors gets 2 each
    return d, data, cache


def _changes(data, n):
    return leave_one_out(data, data.ids[:n]) + [make_change_set(data, delete_ids=torch.arange(100, 130),
                                                                n_classes=3)]


def _same(a, b):
    # computed in other processes: equal to round-off (tests/processes.py), failed requests (NaN rows)
    # in the same places, and the same decisions (counters, errors) exactly
    assert_same_across_processes(a.params, b.params, "params")
    for k in a.counters:
        assert torch.equal(a.counters[k], b.counters[k]), k
    assert a.errors == b.errors
    # each request's error estimate, priced by the driver from its final state: the same to round-off
    # of the accumulators (inf and NaN in the same places)
    ea, eb = a.stats["error_estimate"], b.stats["error_estimate"]
    assert torch.equal(ea.isfinite(), eb.isfinite()) and torch.equal(ea.isnan(), eb.isnan())
    fin = ea.isfinite()
    assert torch.allclose(ea[fin], eb[fin], rtol=1e-6, atol=0)
    assert torch.equal(a.stats["error_reliable"], b.stats["error_reliable"])


@pytest.mark.parametrize("mode", ["pipeline", "replicated"])
def test_ray_equals_serial(ray_cluster, world, mode):
    d, data, cache = world
    changes = _changes(data, 40)
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=8)
    rb = RayBackend(workers=2, mode=mode, resources={"accel": 1}, strategy="SPREAD")
    ray_rep = rb.run(cache.uri, None, changes, batch_size=8)
    assert ray_rep.stats["mode"] == mode
    _same(serial, ray_rep)
    # ... and both equal the single-request replay (the core's own test covers the tolerance)
    one = api.unlearn(cache, delete=[int(data.ids[0])])
    assert torch.allclose(serial.params[0], one.params, rtol=1e-12, atol=0)


@pytest.mark.parametrize("curvature", ["shared", "own+path"])
@pytest.mark.parametrize("mode", ["pipeline", "replicated"])
def test_ray_equals_serial_with_curvature_beyond_own_pairs(ray_cluster, world, mode, curvature):
    """The batch's shared model (and the path's pairs) travel with its state between stages."""
    from deltagrad_ray.core import DeltaGradConfig
    d, data, cache = world
    changes = _changes(data, 14)
    cfg = DeltaGradConfig(curvature=curvature, period=10)
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=5, config=cfg)
    rep = RayBackend(workers=2, mode=mode, resources={"accel": 1}).run(cache.uri, None, changes, batch_size=5,
                                                                       config=cfg)
    _same(serial, rep)
    own = SerialBackend(threads=1).run(cache, None, changes, batch_size=5, config=DeltaGradConfig(period=10))
    assert not torch.equal(own.params, serial.params)  # the setting reached the replay


def test_shards_are_placed_across_nodes_as_configured(ray_cluster, world):
    import ray
    d, data, cache = world
    rb = RayBackend(workers=2, mode="pipeline", resources={"accel": 1}, strategy="SPREAD")
    rb.start(cache.uri, None)
    try:
        table = ray.util.placement_group_table(rb.pg)
        nodes = set(table["bundles_to_node_id"].values())
        assert len(nodes) == 2  # SPREAD: one accelerator-holding node each
        assert [tuple(i["range"]) for i in rb.info] == [(0, 30), (30, 60)]  # contiguous step ranges, at shard cuts
    finally:
        rb.stop()
    import time
    deadline = time.time() + 30  # removing a placement group frees its resources asynchronously
    while ray.available_resources().get("CPU", 0) < 4 and time.time() < deadline:
        time.sleep(0.2)
    rb = RayBackend(workers=2, mode="pipeline", num_cpus=0.5, strategy="PACK")
    rb.start(cache.uri, None)
    try:
        assert len(set(ray.util.placement_group_table(rb.pg)["bundles_to_node_id"].values())) == 1
    finally:
        rb.stop()


def test_workers_a_static_cluster_can_never_hold_are_refused_at_once(ray_cluster, world):
    from deltagrad_ray.core import InputError
    rb = RayBackend(workers=4, resources={"accel": 1})
    with pytest.raises(InputError, match=r"the cluster has 3 accels, the replay needs 4: 4 workers × 1 accel"):
        rb.start(world[2].uri, None)
    with pytest.raises(InputError, match=r"no node of this cluster can hold one worker \(CPU 3; the largest node "
                                         r"has 2\)"):
        RayBackend(workers=1, num_cpus=3).start(world[2].uri, None)


@pytest.mark.parametrize("mode", ["pipeline", "replicated"])
def test_poisoned_requests_are_isolated_and_the_rest_complete(ray_cluster, world, mode):
    d, data, cache = world
    changes = leave_one_out(data, data.ids[:12])
    # a request the trajectory cannot take (a row index outside the data) ...
    changes[3] = ChangeSet(torch.tensor([10 ** 6]))
    # ... and one that drives the parameters to inf/NaN (a huge but finite added row)
    huge = Dataset(torch.full((1, 10), 1e300, dtype=torch.float64), torch.tensor([0]), torch.tensor([10 ** 7]))
    changes[8] = make_change_set(data, add=huge, n_classes=3)
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=4)
    rep = RayBackend(workers=2, mode=mode, resources={"accel": 1}).run(cache.uri, None, changes, batch_size=4)
    for r in (serial, rep):
        assert set(r.errors) == {3, 8}, r.errors
        assert "row 1000000 is outside the trajectory's 600 rows" in r.errors[3]
        assert "non-finite parameters" in r.errors[8]
        ok = [i for i in range(12) if i not in (3, 8)]
        assert torch.isfinite(r.params[ok]).all()
        assert torch.isnan(r.params[[3, 8]]).all()
    _same(serial, rep)


@pytest.fixture(scope="module")
def linear_world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-linear")
    from deltagrad_ray.core import synthetic_regression
    data = synthetic_regression(600, 10, seed=0)
    write_dataset(data, d / "data.parquet")
    cache = api.fit(str(d / "data.parquet"), str(d / "cache"), model="linear", steps=60, lr=0.1, l2=0.01,
                    shard_steps=15)
    return d, data, cache


def test_a_request_failing_after_the_first_pipeline_stage_is_isolated(ray_cluster, linear_world):
    """A request whose replay goes non-finite in the second of two pipeline stages is reported;
    the rest of its batch goes on unaffected, as in the serial backend."""
    d, data, cache = linear_world
    changes = leave_one_out(data, data.ids[:8])
    # least squares diverges geometrically along a row this large (η‖x‖²/n ≈ 1.7e7): the
    # parameters overflow after ~40 of the 60 steps, in the second stage (steps 30-59)
    big = Dataset(torch.full((1, 10), 1e5, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                  torch.tensor([10 ** 7]))
    changes[5] = make_change_set(data, add=big)
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=4)
    rep = RayBackend(workers=2, mode="pipeline", resources={"accel": 1}).run(cache.uri, None, changes, batch_size=4)
    assert rep.stats["mode"] == "pipeline" and rep.stats["retries"] == 0
    for r in (serial, rep):
        assert set(r.errors) == {5}
        step = int(r.errors[5].split("at step ")[1].split(",")[0])
        assert step >= 30, f"the failure must come after the first stage (steps 0-29) to test this; got {step}"
        assert torch.isfinite(r.params[[0, 1, 2, 3, 4, 6, 7]]).all() and torch.isnan(r.params[5]).all()
    _same(serial, rep)
    alone = api.unlearn(cache, delete=[int(data.ids[4])])
    assert torch.allclose(rep.params[4], alone.params, rtol=1e-12, atol=0)  # its batch-mate is unaffected


def test_a_batch_is_split_after_a_pipeline_stage_with_every_field_of_its_state(linear_world):
    """The driver removes requests from a batch at any stage (here after the first of two): the
    selected state carries every field, and the rest replays as if it had been alone in the batch."""
    from deltagrad_ray.core import DeltaGradConfig
    from deltagrad_ray.distributed.collect import Job
    from deltagrad_ray.distributed.worker import ReplayWorker
    d, data, cache = linear_world
    changes = leave_one_out(data, data.ids[:4])
    cfg = DeltaGradConfig(schedule="adaptive")  # every field of the state in use
    first, second = ReplayWorker(cache.uri, steps=(0, 30)), ReplayWorker(cache.uri, steps=(30, 60))
    job = Job([10, 11, 12, 13], changes, stage=1, state=first.advance(changes, cfg, None, None))
    rest = job.without([1, 2])
    assert rest.members == [10, 13] and rest.stage == 1 and rest.state.B == 2
    for name, v in rest.state._values():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, getattr(job.state, name)[[0, 3]]), name
    end = second.advance(rest.changes, cfg, None, rest.state)
    whole = second.advance(changes, cfg, None, job.state)
    assert torch.allclose(end.W, whole.W[[0, 3]], rtol=1e-12, atol=0)
    assert torch.equal(end.explicit_steps, whole.explicit_steps[[0, 3]])


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_a_programming_error_in_a_worker_fails_the_run_at_once(ray_cluster, world, backend):
    """Not a request's fault (here: settings of the wrong type reach the workers): no isolation,
    no per-request errors, no retries — the run stops with the original error."""
    d, data, cache = world
    changes = _changes(data, 6)
    bad_config = {"period": 5}  # a dict where a DeltaGradConfig belongs
    if backend == "serial":
        with pytest.raises(AttributeError, match="'dict' object has no attribute"):
            SerialBackend(threads=1).run(cache, None, changes, batch_size=2, config=bad_config)
    else:
        with pytest.raises(AttributeError, match="'dict' object has no attribute"):
            RayBackend(workers=2, resources={"accel": 1}).run(cache.uri, None, changes, batch_size=2,
                                                               config=bad_config)


def test_results_are_incremental_and_resumable(world, tmp_path):
    d, data, cache = world
    changes = _changes(data, 20)
    sig = {"run": "t"}
    first = SerialBackend(threads=1).run(cache, None, changes[:8], batch_size=4,
                                         sink=ResultSink(tmp_path / "parts", {**sig, "n": 8}))
    # a different run at the same location is refused, nothing is lost
    from deltagrad_ray.core import InputError
    with pytest.raises(InputError, match="holds partial results of a different run"):
        ResultSink(tmp_path / "parts", {"run": "other"})
    sink = ResultSink(tmp_path / "parts2", sig)
    calls = []
    SerialBackend(threads=1).run(cache, None, changes, batch_size=4, sink=sink, progress=calls.append)
    again = SerialBackend(threads=1).run(cache, None, changes, batch_size=4, sink=ResultSink(tmp_path / "parts2", sig),
                                         progress=calls.append)
    assert calls[-1] == len(changes)  # the rerun found every request already done
    assert torch.equal(again.params[:8], first.params)


def test_parts_are_named_by_their_first_request_and_a_resume_fills_the_gaps(world, tmp_path):
    """Issue 22: a part's name is its first request; a rerun after a part was lost writes only the
    missing batch, under the same name; the same batch written twice (a lost response) is no
    error, another batch under a taken name is; a damaged part names itself."""
    from deltagrad_ray.core.replay import COUNTERS
    from deltagrad_ray.store.parts import part_name
    from deltagrad_ray.store.location import StorageError
    d, data, cache = world
    changes = _changes(data, 9)  # 10 requests, batches of 4: parts at 0, 4, 8
    sig = {"run": "positional"}
    full = SerialBackend(threads=1).run(cache, None, changes, batch_size=4, sink=ResultSink(tmp_path / "p", sig))
    names = sorted(p.name for p in (tmp_path / "p").iterdir() if p.name.startswith("part-"))
    assert names == [part_name(0), part_name(4), part_name(8)] == ["part-000000000.parquet", "part-000000004.parquet",
                                                                    "part-000000008.parquet"]
    middle = (tmp_path / "p" / part_name(4)).read_bytes()
    (tmp_path / "p" / part_name(4)).unlink()
    done = []
    again = SerialBackend(threads=1).run(cache, None, changes, batch_size=4, sink=ResultSink(tmp_path / "p", sig),
                                         progress=done.append)
    assert done == [6, 4]  # progress increments: six requests loaded, then the missing batch of four replayed
    assert (tmp_path / "p" / part_name(4)).read_bytes() != b"" and torch.equal(again.params, full.params)
    sink = ResultSink(tmp_path / "p", sig)
    p = full.params.shape[1]
    zeros = {k: torch.zeros(4, dtype=torch.long) for k in COUNTERS}
    sink.write([4, 5, 6, 7], full.params[4:8], zeros, {})  # the same batch again: nothing to do
    with pytest.raises(StorageError, match=r"part-000000004.parquet: already holds other requests than this batch's"):
        sink.write([4, 5], full.params[4:6], {k: v[:2] for k, v in zeros.items()}, {})
    (tmp_path / "p" / part_name(8)).write_bytes(middle[:100])
    with pytest.raises(StorageError, match=r"part-000000008.parquet: damaged \(not a readable Parquet file"):
        sink.load(len(changes), p)


def test_ray_settings_are_checked_before_any_work():
    """Issue 22: values Ray would reject late, or with an unreadable message, are refused at once."""
    for kwargs, message in [({"num_cpus": 0}, "num_cpus must be a finite number > 0, got 0"),
                            ({"num_gpus": float("inf")}, "num_gpus must be a finite number >= 0, got inf"),
                            ({"connect_timeout_s": 0}, "connect_timeout_s must be a finite number > 0, got 0"),
                            ({"max_in_flight": 0}, "max_in_flight must be an integer >= 1"),
                            ({"address": "http://head:8265"}, "is an HTTP address"),
                            ({"address": "head:0"}, "expected HOST:PORT")]:
        with pytest.raises(InputError, match=message.replace("(", r"\(")):
            RayBackend(**kwargs)


@pytest.mark.integration
def test_actor_killed_and_node_removed_mid_run_every_result_once(ray_cluster, world, tmp_path):
    """500 LOO requests; an actor is killed and a worker node removed while they run."""
    import ray
    d, data, cache = world
    changes = leave_one_out(data, data.ids[:500])
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=25)
    rb = RayBackend(workers=2, mode="pipeline", resources={"accel": 1}, strategy="SPREAD")
    rb.start(cache.uri, None)
    victim_node = None

    def inject(done: int) -> None:
        nonlocal victim_node
        if done == 6:
            ray.kill(rb.actors[0], no_restart=False)       # the actor restarts; its batch is re-run
        if done == 16:
            table = ray.util.placement_group_table(rb.pg)
            node_id = table["bundles_to_node_id"][1]
            for node in ray_cluster.worker_nodes:
                if node.node_id == node_id:
                    victim_node = node
                    ray_cluster.remove_node(node)           # the node dies with actor 1
                    break

    sink = ResultSink(tmp_path / "parts", {"run": "faults"})
    try:
        rep = rb.run(cache.uri, None, changes, batch_size=25, sink=sink, on_stage=inject)
    finally:
        rb.stop()
        if victim_node is not None:
            ray_cluster.add_node(num_cpus=1, resources={"accel": 1}, node_ip_address="127.0.0.1")
            ray_cluster.wait_for_nodes()
    assert rep.stats["retries"] >= 1
    assert not rep.errors
    _same(serial, rep)
    # every request's result was written exactly once
    finished = sink.load()
    assert sorted(finished) == list(range(500))
    parts_rows = sum(len(p.read_bytes()) > 0 for p in sink.root.list() if p.name.startswith("part-"))
    assert parts_rows == 20  # 500 / 25 batches, one part each, no duplicates


@pytest.mark.integration
def test_a_node_lost_and_replaced_20_s_later_loses_no_request(ray_cluster, world, tmp_path):
    """Elastic cluster: three pipeline stages on the three nodes (no spare). A worker node is
    removed mid-run; its stage cannot run anywhere until a new node joins 20 s later. The driver
    keeps retrying within its time budget, and every result arrives exactly once."""
    import threading
    import time

    import ray
    d, data, cache = world
    changes = leave_one_out(data, data.ids[:120])
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=10)
    notes: list[str] = []
    rb = RayBackend(workers=3, mode="pipeline", num_cpus=0.5, resources={"accel": 1}, strategy="SPREAD",
                    notify=notes.append)
    rb.start(cache.uri, None)
    events: dict = {}
    reached = threading.Event()
    sink = ResultSink(tmp_path / "parts", {"run": "elastic"})

    def inject(done: int) -> None:
        if done == 4:
            reached.set()

    def drive() -> None:  # the driver in a thread: nodes are added and removed from the main thread
        try:
            events["report"] = rb.run(cache.uri, None, changes, batch_size=10, sink=sink, on_stage=inject)
            events["finished"] = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            events["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        assert reached.wait(300)
        bundles = ray.util.placement_group_table(rb.pg)["bundles_to_node_id"]
        workers = {n.node_id: n for n in ray_cluster.worker_nodes}
        ray_cluster.remove_node(next(workers[nid] for nid in bundles.values() if nid in workers))
        events["removed"] = time.monotonic()
        time.sleep(20)
        ray_cluster.add_node(num_cpus=1, resources={"accel": 1}, node_ip_address="127.0.0.1")
        events["added"] = time.monotonic()
        ray_cluster.wait_for_nodes()
        driver.join(600)
    finally:
        rb.stop()
    if "error" in events:
        raise events["error"]
    rep, finished = events["report"], events["finished"]
    assert finished > events["added"], "the run must have needed the replacement node"
    assert rep.stats["retries"] >= 1 and not rep.errors
    assert any("retry" in n for n in notes)
    _same(serial, rep)
    finished_parts = sink.load()
    assert sorted(finished_parts) == list(range(120))
    assert sum(1 for p in sink.root.list() if p.name.startswith("part-")) == 12  # one part per batch


def test_the_driver_waits_for_resources_the_cluster_frees_later(ray_cluster, world):
    """Resources taken by someone else are waited for (with a line saying what is awaited), not refused."""
    import threading
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    d, data, cache = world
    hog = placement_group([{"accel": 1}] * 3)
    ray.get(hog.ready(), timeout=60)
    threading.Timer(8, lambda: remove_placement_group(hog)).start()
    notes: list[str] = []
    t0 = time.monotonic()
    rep = RayBackend(workers=2, resources={"accel": 1}, notify=notes.append).run(cache.uri, None, _changes(data, 4),
                                                                                 batch_size=2)
    assert time.monotonic() - t0 >= 7 and not rep.errors
    assert notes and notes[0].startswith("waiting for 2 workers of {'CPU': 1, 'accel': 1}")


def test_local_paths_are_refused_on_a_cluster_spanning_hosts(ray_cluster, world):
    """A file:// cache is read by each node from its own disk: on several hosts that is refused."""
    d, data, cache = world
    other = ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2")  # another host, as Ray sees it
    ray_cluster.wait_for_nodes()
    try:
        with pytest.raises(InputError, match=r"is a local path, but the Ray cluster spans 2 hosts \(127.0.0.1, "
                                             r"127.0.0.2\): each node would read its own disk; use an s3://"):
            RayBackend(workers=1).run(cache.uri, None, _changes(data, 2), batch_size=2)
        # a filesystem every node mounts (here: one machine) is allowed when said so
        rep = RayBackend(workers=1, shared_filesystem=True).run(cache.uri, None, _changes(data, 2), batch_size=2)
        assert not rep.errors
    finally:
        ray_cluster.remove_node(other)


def test_cli_loo_on_the_ray_backend_equals_serial(ray_cluster, world, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from deltagrad_ray.results import read_table
    d, data, cache = world
    (tmp_path / "ids.txt").write_text("\n".join(str(int(i)) for i in data.ids[:20]))
    outs = {}
    for backend in ("serial", "ray"):
        args = [sys.executable, "-m", "deltagrad_ray.cli", "--json", "loo", "--cache", cache.uri, "--ids",
                str(tmp_path / "ids.txt"), "--batch-size", "8", "--backend", backend,
                "--out", str(tmp_path / f"{backend}.parquet")]
        if backend == "ray":
            args += ["--address", ray_cluster.address, "--workers", "2", "--mode", "pipeline"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout.strip().splitlines()[-1])["backend"] == backend
        outs[backend] = read_table(tmp_path / f"{backend}.parquet")[0]
        assert not (tmp_path / f"{backend}.parquet.parts").exists()  # parts removed once the file is written
    assert outs["serial"].column("id").to_pylist() == outs["ray"].column("id").to_pylist()
    a = torch.tensor(outs["serial"].column("params").to_pylist())
    b = torch.tensor(outs["ray"].column("params").to_pylist())
    assert torch.allclose(a, b, rtol=1e-12, atol=0)  # serial here runs with the CLI process's threads
    ea, eb = (torch.tensor(outs[k].column("error_estimate").to_pylist()) for k in ("serial", "ray"))
    assert ea.isfinite().all() and torch.allclose(ea, eb, rtol=1e-6, atol=0)


def test_data_parallel_mode_equals_serial(ray_cluster, world, tmp_path):
    """Features split over data actors; replay actors keep ids and labels only."""
    d, data, cache = world
    extra = synthetic_classification(5, 10, 3, seed=8)
    changes = _changes(data, 16) + [make_change_set(data, add=Dataset(extra.X, extra.y, extra.ids + 9000),
                                                    n_classes=3)]  # additions too
    serial = SerialBackend(threads=1).run(cache, None, changes, batch_size=8)
    rb = RayBackend(workers=2, mode="pipeline", resources={"accel": 1}, data_shards=2)
    rep = rb.run(cache.uri, None, changes, batch_size=8)
    # the shards' partial gradients are summed in another order than one pass over all rows; the
    # multi-secant model (the default here) can amplify that round-off ~1e6× (see test_batched.py)
    assert torch.allclose(rep.params, serial.params, rtol=1e-9, atol=1e-12)
    assert all(a["data_bytes"] == 0 for a in rep.stats["actors"])          # no features in replay actors
    assert [s["range"] for s in rep.stats["data_shards"]] == [[0, 300], [300, 600]]


def test_data_parallel_mode_on_sgd_with_removed_and_added_rows(ray_cluster, tmp_path):
    data = synthetic_classification(800, 8, 3, seed=5)
    write_dataset(data, tmp_path / "data.parquet")
    base = api.fit(str(tmp_path / "data.parquet"), str(tmp_path / "c0"), optimizer="sgd", batch_size=200, steps=40,
                   lr=0.3, l2=0.01, shard_steps=10)
    extra = synthetic_classification(6, 8, 3, seed=6)
    api.unlearn(base, delete=[1, 2, 3], add=Dataset(extra.X, extra.y, extra.ids + 5000),
                out_cache=str(tmp_path / "c1"))   # a derived cache: removed rows and added rows
    from deltagrad_ray.store import open_cache
    c1 = open_cache(tmp_path / "c1")
    ds = c1.data()
    changes = leave_one_out(ds, torch.tensor([10, 20, 5001, 5003]))
    serial = SerialBackend(threads=1).run(c1, None, changes, batch_size=2)
    rep = RayBackend(workers=1, mode="replicated", data_shards=2).run(c1.uri, None, changes, batch_size=2)
    assert torch.allclose(rep.params, serial.params, rtol=1e-9, atol=1e-12)  # as in the test above


def test_data_shards_auto_follows_the_memory_cap(world):
    from deltagrad_ray.core import InputError
    cache = world[2]  # 600 × 10 float64 = 48 kB of features
    assert RayBackend(actor_memory_mb=1)._choose_data_shards(cache) == 0
    assert RayBackend(actor_memory_mb=0.01)._choose_data_shards(cache) == 5
    with pytest.raises(InputError, match="data_shards must be 'auto' or an integer >= 0"):
        RayBackend(data_shards=-1)


def test_data_shards_the_cluster_cannot_hold_are_refused_before_any_actor_starts(ray_cluster, world):
    import ray
    before = len(ray.util.placement_group_table())
    rb = RayBackend(workers=2, data_shards=5, data_cpus=1)       # 2 + 5 CPUs on a 4-CPU cluster
    with pytest.raises(InputError, match=r"the cluster has 4 CPUs, the replay needs 7: 2 workers × 1 CPU "
                                         r"\+ 5 data actors × 1 CPU"):
        rb.run(world[2].uri, None, _changes(world[1], 2), batch_size=2)
    assert rb.actors == [] and rb.data_actors == [] and len(ray.util.placement_group_table()) == before
