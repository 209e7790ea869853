"""The pipelines' config helpers, from the library (:mod:`deltagrad_ray.jobs.config`)."""

from deltagrad_ray.jobs.config import (DELTAGRAD as DELTAGRAD, RAY as RAY, REQUIRED as REQUIRED, S3 as S3,
                                       check as check, fanout as fanout, load as load, main as main)
