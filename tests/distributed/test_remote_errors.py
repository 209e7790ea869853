"""The project's errors cross process boundaries with their type, message and attributes (issue 22):
raised in a Ray task, or while an actor is built, they reach the driver as raised in process."""

from __future__ import annotations

import pickle

import pytest

from deltagrad_ray.core import InputError, RequestError
from deltagrad_ray.distributed.errors import keeps_init_error, local_error
from deltagrad_ray.store.location import Conflict, StorageError


class HeldBy(StorageError):
    """A subclass whose __init__ takes other arguments than its message (as erasure's lease errors do)."""

    def __init__(self, uri: str, holder: str) -> None:
        super().__init__(f"{uri}: held by {holder}")
        self.holder = holder


class Broken:
    """An actor whose construction fails with a storage error."""

    def __init__(self, uri: str) -> None:
        raise HeldBy(uri, "run-7")

    def info(self) -> dict:
        return {}


ERRORS = [InputError("ids must be int64, got float32"), StorageError("s3://b/x: not found"),
          Conflict("s3://b/x: already exists; refusing to overwrite it"), RequestError({2: "id 9 is not in the data"}),
          HeldBy("s3://b/models/_lease.json", "run-1")]


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_type_message_and_attributes(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: type(e).__name__)
def test_an_error_raised_in_a_ray_task_is_unwrapped_to_itself(ray_cluster, error):
    import ray

    @ray.remote(num_cpus=0)
    def fail(e):
        raise e

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(fail.remote(error))
    assert "\n" in str(caught.value)                 # Ray's wrapper: the remote traceback
    mine = local_error(caught.value)
    assert type(mine) is type(error) and str(mine) == str(error) and vars(mine) == vars(error)
    assert local_error(error) is error               # nothing to unwrap


def test_an_actor_whose_construction_fails_reports_the_error_at_its_first_call(ray_cluster):
    import ray
    plain = ray.remote(num_cpus=0)(Broken).remote("s3://b/c1")
    with pytest.raises(ray.exceptions.RayActorError) as caught:  # Ray alone: the error as text only
        ray.get(plain.info.remote())
    assert not isinstance(local_error(caught.value), StorageError)
    kept = ray.remote(num_cpus=0)(keeps_init_error(Broken)).remote("s3://b/c1")
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(kept.info.remote())
    mine = local_error(caught.value)
    assert type(mine) is HeldBy and str(mine) == "s3://b/c1: held by run-7" and mine.holder == "run-7"
    ray.kill(kept)
