"""infra/: every file loads, validates (Ray's own schema for the AWS cluster config; required
fields of the KubeRay and Kubernetes manifests; the Dockerfile's rules), the files agree with
each other, and every command and path they name exists in the repository.

No network, no cluster, no Docker: the files are read, not deployed.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from . import checks
from .checks import INFRA, ROOT, rel

CLUSTER = INFRA / "aws" / "cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
CRONJOB = INFRA / "kuberay" / "cronjob-bulk-erasure.yaml"
SERVICEACCOUNT = INFRA / "kuberay" / "serviceaccount.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
README = INFRA / "README.md"
INSTALL = INFRA / "install.sh"
PYPROJECT = ROOT / "pyproject.toml"
PIPELINES = ("train", "bulk_erasure", "jackknife", "conformal")
CONFIGS = {name: INFRA / "configs" / f"{name}.yaml" for name in PIPELINES}
BUCKET = "s3://deltagrad-prod/"

# The config keys each pipeline reads (the contract of issue 6); nested blocks are mappings.
RAY_BLOCK = {"address", "workers", "num_cpus", "num_gpus", "mode", "strategy", "batch_size"}
CONTRACT = {
    "train": {"data", "cache", "publish", "model", "optimizer", "report"},
    "bulk_erasure": {"data", "cache", "requests", "output", "name", "models", "ledger", "deltagrad", "verify",
                     "reconcile", "retention", "lease", "ray", "report"},
    "jackknife": {"cache", "test", "output", "ray", "report"},
    "conformal": {"cache", "test", "output", "alpha", "method", "folds", "ray", "report"},
}
LOCATION_KEYS = {"data", "cache", "publish", "requests", "output", "ledger", "test", "report"}


@functools.cache
def doc(path: pathlib.Path):
    """The single YAML document of an infra file."""
    docs = checks.load_yaml_docs(path)
    assert len(docs) == 1, f"{rel(path)}: expected one YAML document, found {len(docs)}"
    return docs[0]


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    return checks.dockerfile_instructions(DOCKERFILE.read_text())


def image_workdir() -> str:
    return checks.workdir(dockerfile())


def constraint_pin(name: str) -> str:
    """The version constraints.txt pins for a package."""
    m = re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert m, f"constraints.txt pins no {name}"
    return m.group(1)


def worker_group(spec: dict) -> dict:
    """The (single) GPU worker group of a RayCluster spec."""
    (group,) = spec["workerGroupSpecs"]
    return group


def ray_pod_templates(manifest: dict, spec_path: tuple[str, ...] = ("spec",)) -> list[dict]:
    spec = manifest
    for key in spec_path:
        spec = spec[key]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def cron_container() -> dict:
    (c,) = doc(CRONJOB)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return c


# -- every file is known and loads -----------------------------------------------------------------

FLEET = INFRA / "configs" / "bulk_erasure_fleet.yaml"
VALIDATED_YAML = {CLUSTER, RAYCLUSTER, RAYJOB, CRONJOB, SERVICEACCOUNT, FLEET, *CONFIGS.values()}


def test_every_yaml_file_in_infra_has_checks_here():
    found = {p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert found == VALIDATED_YAML, ("add checks for new files, remove the entries of deleted ones: "
                                     f"unchecked {sorted(map(rel, found - VALIDATED_YAML))}, "
                                     f"missing {sorted(map(rel, VALIDATED_YAML - found))}")


@pytest.mark.parametrize("path", sorted(VALIDATED_YAML), ids=rel)
def test_yaml_file_loads_as_one_mapping(path):
    docs = checks.load_yaml_docs(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), rel(path)


# -- AWS: Ray's cluster launcher -------------------------------------------------------------------

@functools.cache
def ray_schema() -> dict:
    import ray.autoscaler
    return json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def validate_like_ray_up(config: dict) -> None:
    """What `ray up` checks before it contacts AWS: the schema, then defaults filled in and validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_cluster_config_passes_rays_own_validation():
    validate_like_ray_up(doc(CLUSTER))


@pytest.mark.parametrize("change, error", [
    (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU="1"), jsonschema.ValidationError),
    (lambda c: c.update(max_worker=8), jsonschema.ValidationError),
    (lambda c: c["docker"].update(gpus="all"), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="ray.head.default"), ValueError),
    (lambda c: c.update(max_workers=1), ValueError),
], ids=["gpu-as-string", "misspelt-key", "unknown-docker-option", "unknown-head-type", "min-above-max"])
def test_rays_validation_rejects_broken_variants_of_the_config(change, error):
    config = copy.deepcopy(doc(CLUSTER))
    change(config)
    with pytest.raises(error):
        validate_like_ray_up(config)


GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5|p5e)\.")


def test_aws_cluster_has_a_cpu_head_and_gpu_workers_with_instance_profiles():
    c = doc(CLUSTER)
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "the head should be a CPU instance"
    assert head["resources"].get("CPU") == 0, "keep shard actors off the head (CPU: 0)"
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker node type with a GPU"
    for w in gpu:
        assert GPU_INSTANCE.match(w["node_config"]["InstanceType"]), w["node_config"]["InstanceType"]
        assert 0 <= w["min_workers"] <= w["max_workers"] <= c["max_workers"]
    for name, t in types.items():
        # S3 (and, for the head, EC2) access from instance profiles: no keys on the nodes
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no IamInstanceProfile"
        assert t["node_config"].get("MetadataOptions", {}).get("HttpTokens") == "required", f"{name}: IMDSv2"


def test_aws_cluster_keeps_the_dashboard_private_and_authenticates():
    c = doc(CLUSTER)
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard must listen on the head's loopback"
    assert "0.0.0.0" not in head_start
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    assert c["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token must reach every node"
    rules = c["provider"]["security_group"]["IpPermissions"]
    assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(22, 22)}, "only SSH from outside"
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"]), "SSH open to the world"


def test_aws_nodes_know_the_region_of_the_cluster():
    c = doc(CLUSTER)
    assert f"--env AWS_REGION={c['provider']['region']}" in c["docker"]["run_options"], (
        "pyarrow's S3 client needs the region; it defaults to us-east-1")
    assert c["provider"]["availability_zone"].startswith(c["provider"]["region"])


def test_aws_nodes_install_the_project_like_the_image_and_the_repo():
    c = doc(CLUSTER)
    assert c["file_mounts"]["~/deltagrad-ray"] == ".", "the repository is mounted at ~/deltagrad-ray"
    assert any("bash infra/install.sh" in cmd for cmd in c["setup_commands"])
    assert any(args.endswith("bash infra/install.sh") for instr, args in dockerfile() if instr == "RUN")
    # ~/deltagrad-ray on the nodes is the image's WORKDIR: one layout everywhere
    assert image_workdir() == "/home/ray/deltagrad-ray"


# -- KubeRay and Kubernetes manifests --------------------------------------------------------------

def test_raycluster_manifest_is_complete():
    assert checks.raycluster_problems(doc(RAYCLUSTER), rel(RAYCLUSTER), ray_version=ray.__version__) == []


def test_rayjob_manifest_is_complete():
    assert checks.rayjob_problems(doc(RAYJOB), rel(RAYJOB), ray_version=ray.__version__) == []


def test_cronjob_manifest_is_complete():
    assert checks.cronjob_problems(doc(CRONJOB), rel(CRONJOB)) == []


def test_serviceaccount_manifest_is_complete():
    assert checks.serviceaccount_problems(doc(SERVICEACCOUNT), rel(SERVICEACCOUNT)) == []
    assert doc(SERVICEACCOUNT)["metadata"]["namespace"] == doc(RAYCLUSTER)["metadata"]["namespace"]


@pytest.mark.parametrize("path, value, message", [
    ("kind", "Secret", "expected apiVersion v1 kind ServiceAccount"),
    ("metadata.name", "ray", "the Ray pods use the service account 'deltagrad-ray'"),
    ("metadata.annotations", None, "eks.amazonaws.com/role-arn must be an IAM role ARN"),
    ("automountServiceAccountToken", None, "automountServiceAccountToken must be false"),
])
def test_serviceaccount_checks_catch_each_mistake(path, value, message):
    manifest = copy.deepcopy(doc(SERVICEACCOUNT))
    _set(path, value)(manifest)
    problems = checks.serviceaccount_problems(manifest, "m")
    assert any(message in p for p in problems), problems


def _set(path: str, value):
    def change(d):
        *keys, last = path.split(".")
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[k]
        key = int(last) if isinstance(d, list) else last
        if value is None:
            del d[key]
        else:
            d[key] = value
    return change


WORKER = "spec.workerGroupSpecs.0"
WORKER_C = f"{WORKER}.template.spec.containers.0"


HEAD_T = "spec.headGroupSpec.template.spec"
RAYCLUSTER_MISTAKES = [
    (f"{HEAD_T}.containers.0.resources.limits.memory", "8Gi", "head memory 8Gi is below 16Gi"),
    (f"{HEAD_T}.containers.0.resources.requests.memory", "8Gi", None),  # (a request may be lower: no problem)
    (f"{HEAD_T}.volumes", [], "no in-memory emptyDir at /dev/shm"),
    (f"{HEAD_T}.volumes.0.emptyDir.sizeLimit", "1Gi", "does not fit /dev/shm (sizeLimit 1Gi)"),
    (f"{HEAD_T}.volumes.0.emptyDir.sizeLimit", "16Gi", "must be set and below the memory limit"),
    ("spec.headGroupSpec.rayStartParams.object-store-memory", None, "set rayStartParams.object-store-memory"),
    (f"{HEAD_T}.serviceAccountName", None, "serviceAccountName must be 'deltagrad-ray'"),
    (f"{WORKER}.template.spec.volumes.0.emptyDir.medium", "", "no in-memory emptyDir at /dev/shm"),
    ("apiVersion", "ray.io/v1alpha1", "expected apiVersion ray.io/v1"),
    ("metadata.name", "DeltaGrad", "must be lowercase"),
    ("spec.rayVersion", "2.9.0", "differs from the project's Ray"),
    ("spec.authOptions", None, "missing required field authOptions.mode"),
    ("spec.headGroupSpec.serviceType", "LoadBalancer", "exposes the dashboard"),
    ("spec.headGroupSpec.rayStartParams.num-cpus", 0, "must be a string"),
    ("spec.headGroupSpec.template.spec.containers.0.image", "rayproject/ray:latest", "tagged 'latest'"),
    ("spec.headGroupSpec.template.spec.containers.0.image", "rayproject/ray", "has no tag"),
    (f"{WORKER}.maxReplicas", 1, "minReplicas <= replicas <= maxReplicas"),
    (f"{WORKER}.groupName", None, "missing required field groupName"),
    (f"{WORKER_C}.resources.limits.nvidia.com/gpu", None, "integer nvidia.com/gpu limit"),
    (f"{WORKER_C}.resources.requests.memory", "64Gi", "memory request 64Gi exceeds its limit"),
    (f"{WORKER}.template.spec.securityContext", None, "must run as non-root"),
]


@pytest.mark.parametrize("path, value, message", RAYCLUSTER_MISTAKES,
                         ids=[m or f"{p}-ok" for p, _, m in RAYCLUSTER_MISTAKES])
def test_raycluster_checks_catch_each_mistake(path, value, message):
    manifest = copy.deepcopy(doc(RAYCLUSTER))
    if "nvidia.com/gpu" in path:  # a key with dots: remove it directly
        container = manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        del container["resources"]["limits"]["nvidia.com/gpu"]
    else:
        _set(path, value)(manifest)
    problems = checks.raycluster_problems(manifest, "m", ray_version=ray.__version__)
    if message is None:
        assert problems == []
    else:
        assert any(message in p for p in problems), problems


@pytest.mark.parametrize("path, value, message", [
    ("spec.shutdownAfterJobFinishes", False, "shutdownAfterJobFinishes must be true"),
    ("spec.entrypoint", None, "missing required field entrypoint"),
    ("spec.submissionMode", "Batch", "is not one of"),
    ("spec.runtimeEnvYAML", "- working_dir", "must be a YAML mapping"),
    ("spec.rayClusterSpec.workerGroupSpecs", [], "no workerGroupSpecs"),
])
def test_rayjob_checks_catch_each_mistake(path, value, message):
    manifest = copy.deepcopy(doc(RAYJOB))
    _set(path, value)(manifest)
    problems = checks.rayjob_problems(manifest, "m", ray_version=ray.__version__)
    assert any(message in p for p in problems), problems


JOB_POD = "spec.jobTemplate.spec.template.spec"


@pytest.mark.parametrize("path, value, message", [
    ("spec.schedule", "0 2 * *", "has 4 fields"),
    ("spec.schedule", "0 24 * * *", "hour field"),
    ("spec.concurrencyPolicy", "Allow", "must be Forbid"),
    ("spec.startingDeadlineSeconds", None, "missing required field startingDeadlineSeconds"),
    ("spec.jobTemplate.spec.backoffLimit", -1, "backoffLimit must be an integer >= 0"),
    (f"{JOB_POD}.restartPolicy", "Always", "restartPolicy must be Never or OnFailure"),
    (f"{JOB_POD}.containers.0.command", None, "has no command"),
    (f"{JOB_POD}.containers.0.command", ["ray", "job", "submit", "--", "python"], "exits 0 for a STOPPED job"),
    (f"{JOB_POD}.containers.0.command.6", "--submission-id", "pass --job-name $(JOB_NAME)"),
    (f"{JOB_POD}.containers.0.env", [], "env JOB_NAME must come from fieldRef"),
    ("metadata.name", "deltagrad-bulk-erasure-scheduled-nightly-at-two-utc-x", "longer than 52"),
])
def test_cronjob_checks_catch_each_mistake(path, value, message):
    manifest = copy.deepcopy(doc(CRONJOB))
    _set(path, value)(manifest)
    problems = checks.cronjob_problems(manifest, "m")
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("schedule", ["0 2 * * *", "*/15 * * * *", "0 0-6/2 1,15 JAN-JUN MON-FRI", "30 3 * * 7",
                                      "0 2 ? * SUN"])
def test_valid_cron_schedules(schedule):
    assert checks.cron_problems(schedule) == []


@pytest.mark.parametrize("schedule, message", [
    ("0 2 * *", "has 4 fields"),
    ("0 2 * * * *", "has 6 fields"),
    ("60 2 * * *", "minute field"),
    ("0 2 0 * *", "day of month field"),
    ("0 2 * 13 *", "month field"),
    ("0 2 * * 8", "day of week field"),
    ("0 6-2 * * *", "decreasing"),
    ("*/0 * * * *", "step"),
    ("0 2 * * FUNDAY", "not a number"),
    ("TZ=UTC 0 2 * * *", "spec.timeZone"),
])
def test_invalid_cron_schedules_are_named(schedule, message):
    problems = checks.cron_problems(schedule)
    assert problems and message in problems[0], problems


def test_kubernetes_quantities():
    assert checks.quantity("500m") == 0.5
    assert checks.quantity("8Gi") == 8 * 2 ** 30
    assert checks.quantity(2) == 2
    assert checks.quantity("1G") == 1e9
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        checks.quantity("8 GB")


# -- the files agree with each other ---------------------------------------------------------------

def test_cronjob_submits_bulk_erasure_to_the_rayclusters_head_with_its_token():
    rc, cron, c = doc(RAYCLUSTER), doc(CRONJOB), cron_container()
    words = c["command"] + c.get("args", [])
    # the submitter: one Ray job per scheduled run, followed, exit 0 only for SUCCEEDED
    assert words[:3] == ["python", "-m", "deltagrad_ray.jobs.submit"]
    assert words[words.index("--job-name") + 1] == "$(JOB_NAME)"
    address = words[words.index("--address") + 1]
    assert address == f"http://{rc['metadata']['name']}-head-svc:8265", "KubeRay's head service, dashboard port"
    assert cron["metadata"]["namespace"] == rc["metadata"]["namespace"], "the short service name needs one namespace"
    assert words[words.index("--working-dir") + 1] == "."
    assert words[words.index("--") + 1:] == ["python", "-m", "pipelines.bulk_erasure",
                                             "--config", "infra/configs/bulk_erasure.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    # KubeRay keeps the generated token in a Secret named after the RayCluster, key auth_token
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": rc["metadata"]["name"], "key": "auth_token"}
    assert rc["spec"]["authOptions"]["mode"] == "token"
    assert c["workingDir"] == image_workdir(), "--working-dir . must be the repository inside the image"


def test_rayjob_runs_jackknife_from_the_repository_in_the_image():
    spec = doc(RAYJOB)["spec"]
    assert spec["entrypoint"] == "python -m pipelines.jackknife --config infra/configs/jackknife.yaml"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == image_workdir()


def test_kubernetes_commands_use_only_what_the_image_contains():
    sources = checks.copy_sources(dockerfile())
    commands = [doc(RAYJOB)["spec"]["entrypoint"], " ".join(cron_container()["command"])]
    for command in commands:
        named = checks.named_paths(command) + [m.replace(".", "/") + ".py" for m in checks.named_modules(command)]
        for p in named:
            assert any(p == s or p.startswith(s.rstrip("/") + "/") for s in sources), f"{p} is not in the image"


def test_one_pinned_image_in_every_kubernetes_container():
    images = set()
    for manifest, spec_path in ((doc(RAYCLUSTER), ("spec",)), (doc(RAYJOB), ("spec", "rayClusterSpec"))):
        for template in ray_pod_templates(manifest, spec_path):
            images |= {c["image"] for c in template["spec"]["containers"]}
    images.add(cron_container()["image"])
    assert len(images) == 1, f"the submitter, head and workers must run the same code: {images}"
    assert checks.image_problems(images.pop(), "image") == []


def test_ray_and_python_versions_agree_everywhere():
    version = constraint_pin("ray")
    assert version == ray.__version__, "the venv runs the pinned Ray"
    py = re.search(r"Python (\d+)\.(\d+)", (ROOT / "constraints.txt").read_text())
    tag = f"{version}-py{py.group(1)}{py.group(2)}"
    assert doc(CLUSTER)["docker"]["image"] == f"rayproject/ray:{tag}-gpu"
    (base,) = checks.base_images(dockerfile())
    assert base == f"rayproject/ray:{tag}-gpu"
    assert doc(RAYCLUSTER)["spec"]["rayVersion"] == version
    assert doc(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"] == version


# -- credentials -----------------------------------------------------------------------------------

def infra_text_files() -> list[pathlib.Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def test_no_credentials_are_written_anywhere_in_infra():
    problems = [p for f in infra_text_files() for p in checks.literal_secret_problems(f.read_text(), rel(f))]
    assert problems == []


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB, CRONJOB], ids=rel)
def test_credential_env_vars_come_from_secrets(path):
    assert checks.env_secret_problems(doc(path), rel(path)) == []


def test_ray_pods_get_s3_credentials_from_the_secret_and_a_region():
    for manifest, spec_path in ((doc(RAYCLUSTER), ("spec",)), (doc(RAYJOB), ("spec", "rayClusterSpec"))):
        for template in ray_pod_templates(manifest, spec_path):
            env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                # optional: without the Secret (IRSA on EKS), the service account's role gives them
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "deltagrad-s3", "key": key, "optional": True}
            assert template["spec"]["serviceAccountName"] == doc(SERVICEACCOUNT)["metadata"]["name"]
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
            assert env["AWS_REGION"]["value"], "pyarrow's S3 client needs the region"


def test_credential_checks_are_not_no_ops():
    key_id = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documentation example, split so it is not a literal here
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert checks.literal_secret_problems(f"env:\n  AWS_ACCESS_KEY_ID: {key_id}\n", "f")
    assert checks.literal_secret_problems(f"AWS_SECRET_ACCESS_KEY={secret}\n", "f")
    assert checks.literal_secret_problems("-----BEGIN RSA " + "PRIVATE KEY-----\n", "f")
    assert not checks.literal_secret_problems('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"', "f")
    manifest = {"spec": {"containers": [{"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"},
                                                 {"name": "RAY_AUTH_TOKEN", "valueFrom": {"configMapKeyRef": {}}},
                                                 {"name": "AWS_REGION", "value": "us-west-2"}]}]}}
    problems = checks.env_secret_problems(manifest, "m")
    assert len(problems) == 2 and "AWS_SECRET_ACCESS_KEY" in problems[0] and "RAY_AUTH_TOKEN" in problems[1]


# -- every command and path named exists -----------------------------------------------------------

def named_commands() -> list[tuple[str, str]]:
    """(where, command) for every command the infra files run or tell a reader to run."""
    found = []
    cluster = doc(CLUSTER)
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        found += [(f"{rel(CLUSTER)} {key}", cmd) for cmd in cluster[key]]
    found.append((f"{rel(RAYJOB)} entrypoint", doc(RAYJOB)["spec"]["entrypoint"]))
    c = cron_container()
    found.append((f"{rel(CRONJOB)} command", " ".join(c["command"] + c.get("args", []))))
    found += [(f"{rel(DOCKERFILE)} RUN", args) for instr, args in dockerfile() if instr == "RUN"]
    found += [(f"{rel(README)} bash", cmd) for cmd in checks.markdown_commands(README.read_text())]
    return found


@pytest.mark.parametrize("where, command", named_commands(), ids=[f"{w}: ...{c[-70:]}" for w, c in named_commands()])
def test_commands_name_only_files_and_modules_that_exist(where, command):
    problems = checks.missing_in_repo(command)
    assert not problems, f"{where}: {command}: {problems}"


def test_readme_mentions_only_paths_that_exist():
    problems = []
    for span in checks.markdown_inline_code(README.read_text()):
        problems += [f"`{span}`: {p}" for p in checks.missing_in_repo(span, roots=(ROOT, INFRA))]
    assert not problems, "\n".join(problems)


def test_aws_file_mounts_name_existing_repository_paths():
    for remote, local in doc(CLUSTER)["file_mounts"].items():
        if not local.startswith("~"):  # ~/... is the launching user's own file (the Ray token)
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local}"


def test_path_extraction_finds_what_matters():
    command = ("cd ~/deltagrad-ray && bash infra/install.sh --quiet; python -m pipelines.x --config=a/b.yaml "
               "-c constraints.txt s3://bucket/key $HOME/f.txt /etc/x.yaml svc/head torch==2.13.0 10.0.0.0/16 "
               "# not/this.py")
    assert checks.named_paths(command) == ["infra/install.sh", "a/b.yaml", "constraints.txt"]
    assert checks.named_modules(command) == ["pipelines.x"]
    assert checks.missing_in_repo("python -m pip install -c constraints.txt -e .") == []
    assert checks.missing_in_repo("python -m nosuchpackage.mod") == [
        "module nosuchpackage.mod: nosuchpackage is not a package of this repository"]
    assert checks.missing_in_repo("ray up infra/aws/no-such.yaml") == ["path infra/aws/no-such.yaml does not exist"]
    assert checks.missing_in_repo("python3 -m deltagrad_ray.nothing") == [
        "module deltagrad_ray.nothing: no deltagrad_ray/nothing.py in the repository"]


# -- the image -------------------------------------------------------------------------------------

def test_dockerfile_is_pinned_copies_existing_files_and_drops_root():
    patterns = checks.dockerignore_patterns(DOCKERIGNORE.read_text())
    assert checks.dockerfile_problems(DOCKERFILE.read_text(), patterns, rel(DOCKERFILE)) == []


def test_dockerfile_checks_catch_each_mistake():
    bad = "\n".join([
        "FROM rayproject/ray:latest",
        "COPY no_such_dir ./",
        "COPY tests tests",
        "RUN bash scripts/dev.sh setup",
        "USER root",
    ])
    problems = checks.dockerfile_problems(bad, ["tests"], "D")
    for message in ("tagged 'latest'", "COPY source no_such_dir does not exist", "tests is excluded",
                    "non-root USER", "OMP_WAIT_POLICY", "RAY_AUTH_MODE", "WORKDIR", "RUN uses scripts/dev.sh"):
        assert any(message in p for p in problems), (message, problems)


def test_dockerfile_parser_handles_args_continuations_and_comments():
    text = ("# syntax=docker/dockerfile:1\nARG BASE=python:3.11-slim\nFROM ${BASE} AS build\n"
            "ENV A=1 \\\n    # a comment inside\n    B=2\nCOPY --chown=ray:users a b ./\n"
            'COPY --from=build /x /y\nCOPY ["c", "d"]\nUSER 1000:1000\n')
    instructions = checks.dockerfile_instructions(text)
    assert checks.base_images(instructions) == ["python:3.11-slim"]
    assert checks.env_settings(instructions) == {"A": "1", "B": "2"}
    assert checks.copy_sources(instructions) == ["a", "b", "c"]
    assert checks.final_user(instructions) == "1000"


def test_dockerignore_keeps_local_state_and_credentials_out():
    patterns = checks.dockerignore_patterns(DOCKERIGNORE.read_text())
    for path in (".git", ".venv", "deltagrad_ray/__pycache__", "x/.env", "keys/id.pem", "home/.aws/credentials",
                 "home/.ray/auth_token"):
        assert checks.ignored(path, patterns), f"{path} would enter the build context"
    assert not checks.ignored("deltagrad_ray/core/replay.py", patterns)


def test_install_script_pins_everything_but_torch_and_installs_a_cuda_capable_torch(tmp_path):
    calls = run_install(tmp_path)
    torch_call, project_call = calls
    version = constraint_pin("torch").split("+")[0]
    assert torch_call["argv"] == ["install", "--no-cache-dir", f"torch=={version}"], "PyPI's (CUDA) wheel"
    torch_req = Requirement(re.search(r'^\s*"(torch[<>=!~][^"]*)"', PYPROJECT.read_text(), re.M).group(1))
    assert Version(version) in torch_req.specifier, f"torch {version} must satisfy pyproject's {torch_req}"
    argv = project_call["argv"]
    assert argv[:2] == ["install", "--no-cache-dir"] and argv[4:] == ["-e", ".", "--quiet"]
    expected = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not line.startswith("torch==")]
    assert project_call["constraints"].splitlines() == expected
    assert {c["cwd"] for c in calls} == {str(ROOT)}


def test_install_script_takes_torch_from_another_index(tmp_path):
    torch_call, _ = run_install(tmp_path, TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu")
    assert torch_call["argv"][2:4] == ["--index-url", "https://download.pytorch.org/whl/cpu"]


FAKE_PIP = """\
import json, os, sys
argv = sys.argv[1:]
record = {"argv": argv, "cwd": os.getcwd()}
if "-c" in argv:
    record["constraints"] = open(argv[argv.index("-c") + 1]).read()
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
"""


def run_install(tmp_path, **env) -> list[dict]:
    """Run infra/install.sh with a pip that only records its arguments."""
    fake, log = tmp_path / "fake_pip.py", tmp_path / "pip.log"
    fake.write_text(FAKE_PIP)
    p = subprocess.run(["bash", str(INSTALL), "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PIP": f"{sys.executable} {fake}", "FAKE_PIP_LOG": str(log), **env})
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


# -- the cluster variants of the pipeline configs --------------------------------------------------

@pytest.mark.parametrize("name", PIPELINES)
def test_cluster_config_has_the_contract_keys(name):
    config = doc(CONFIGS[name])
    assert set(config) == CONTRACT[name]
    if "ray" in config:
        assert set(config["ray"]) == RAY_BLOCK


@pytest.mark.parametrize("name", PIPELINES)
def test_cluster_config_locations_are_all_on_s3(name):
    config = doc(CONFIGS[name])
    for key in LOCATION_KEYS & set(config):
        value = config[key]["output"] if isinstance(config[key], dict) else config[key]
        assert value.startswith(BUCKET), f"{name}.{key} = {value!r} is not under {BUCKET}"


@pytest.mark.parametrize("name", PIPELINES)
def test_cluster_config_values_are_in_range(name):
    c = doc(CONFIGS[name])
    if "deltagrad" in c:
        d = c["deltagrad"]
        # period absent or null: what the curvature calls for (DeltaGradConfig.resolve)
        assert d.get("period") is None or d["period"] >= 1, d
        assert d["burn_in"] >= 0 and d["history"] >= 1, d
    if "verify" in c:
        assert c["verify"]["sample"] >= 0 and c["verify"]["tolerance"] > 0
    if "alpha" in c:
        assert 0 < c["alpha"] < 1 and c["method"] in ("jackknife+", "cv+") and c["folds"] >= 2
    if "ray" in c:
        r = c["ray"]
        assert r["mode"] in ("auto", "pipeline", "replicated") and r["strategy"] in ("SPREAD", "PACK")
        assert r["workers"] >= 1 and r["batch_size"] >= 1 and r["address"] == "auto"


def gpu_node_resources() -> dict[str, tuple[float, float, int]]:
    """(CPUs, GPUs, minimum node count) of the GPU worker type of each cluster definition."""
    aws = doc(CLUSTER)["available_node_types"]["ray.worker.gpu"]
    nodes = {"aws": (aws["resources"]["CPU"], aws["resources"]["GPU"], aws["min_workers"])}
    for name, spec in (("raycluster", doc(RAYCLUSTER)["spec"]), ("rayjob", doc(RAYJOB)["spec"]["rayClusterSpec"])):
        group = worker_group(spec)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        nodes[name] = (checks.quantity(limits["cpu"]), limits[checks.GPU], group["minReplicas"])
    return nodes


@pytest.mark.parametrize("name", [n for n in PIPELINES if "ray" in CONTRACT[n]])
def test_ray_block_asks_for_gpu_fractions_the_minimum_cluster_can_place(name):
    r = doc(CONFIGS[name])["ray"]
    assert 0 < r["num_gpus"] <= 1, "GPU fractions: several shard actors share a GPU"
    for cluster, (cpus, gpus, min_nodes) in gpu_node_resources().items():
        per_node = min(math.floor(cpus / r["num_cpus"] + 1e-9), math.floor(gpus / r["num_gpus"] + 1e-9))
        assert per_node >= 1, f"{cluster}: one actor ({r['num_cpus']} CPU, {r['num_gpus']} GPU) fits no node"
        # the backend waits 120 s for its placement group: less than a new GPU node takes to start
        assert math.ceil(r["workers"] / per_node) <= min_nodes, (
            f"{cluster}: {r['workers']} actors need {math.ceil(r['workers'] / per_node)} nodes, "
            f"only {min_nodes} are kept up")


# These depend on pipelines/ (written alongside infra/): the cluster variants must mirror them.

@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_entry_point_and_local_default_config_exist(name):
    assert (ROOT / "pipelines" / f"{name}.py").is_file(), f"pipelines/{name}.py"
    assert (ROOT / "pipelines" / "configs" / f"{name}.yaml").is_file(), f"pipelines/configs/{name}.yaml"


def key_tree(config) -> dict:
    """The keys of a config at every level of nesting (values dropped)."""
    return {k: key_tree(v) for k, v in config.items()} if isinstance(config, dict) else {}


@pytest.mark.parametrize("name", PIPELINES)
def test_cluster_config_has_the_keys_of_the_local_default(name):
    local = ROOT / "pipelines" / "configs" / f"{name}.yaml"
    assert local.is_file(), f"pipelines/configs/{name}.yaml is missing"
    assert key_tree(doc(CONFIGS[name])) == key_tree(yaml.safe_load(local.read_text()))


def test_downstream_jobs_read_the_published_model():
    """Jackknife and conformal name the models prefix that train publishes version 0 to and bulk
    erasure publishes every later version under: they read LATEST.json, never a cache that still
    holds erased rows (a cache location has a manifest and would be used as it is)."""
    train, erase = doc(CONFIGS["train"]), doc(CONFIGS["bulk_erasure"])
    models = erase["output"]
    assert train["publish"] == models and train["cache"].startswith(models + "/")
    for name in ("jackknife", "conformal"):
        assert doc(CONFIGS[name])["cache"] == models, name
    assert not (erase["ledger"] or "").startswith(erase["requests"] + "/"), (
        "an older ledger honoured from the inbox could be forged by whoever drops request files")
    assert erase["report"]["redact_ids"] is True, "reports for people show data ids as salted hashes"
    assert erase["lease"]["wait_s"] > 0 and erase["lease"]["ttl_s"] >= 300


# instance memory (GiB) of the types the AWS config may use for its head
INSTANCE_MEMORY_GIB = {"m5.xlarge": 16, "m5.2xlarge": 32, "m5.4xlarge": 64, "m6i.2xlarge": 32, "r5.xlarge": 32}


def test_aws_head_is_sized_for_the_driver_and_ray_sizes_dev_shm():
    c = doc(CLUSTER)
    head = c["available_node_types"][c["head_node_type"]]["node_config"]["InstanceType"]
    assert INSTANCE_MEMORY_GIB.get(head, 0) * 2**30 >= checks.HEAD_MEMORY, f"{head}: the drivers run on the head"
    # Ray's launcher sizes the containers' /dev/shm for the object store unless told not to
    assert not c["docker"].get("disable_shm_size_detection")
    options = c["docker"]["run_options"] + c["docker"].get("head_run_options", []) + \
        c["docker"].get("worker_run_options", [])
    assert not any("--shm-size" in o for o in options), "an explicit --shm-size turns Ray's sizing off"


def test_the_fleet_example_is_a_valid_fleet_of_the_bulk_erasure_job():
    """infra/configs/bulk_erasure_fleet.yaml: several models fed from one inbox, each with its own
    output (never overlapping the inbox or another model's), checked as the job checks it."""
    from deltagrad_ray.jobs import bulk_erasure as job
    from deltagrad_ray.jobs.config import check
    cfg = check(doc(FLEET), job.SCHEMA)
    fleet = job.fleet_of(cfg)
    assert len(fleet.models) >= 3 and len({t.output for t in fleet.models}) == len(fleet.models)
    assert any(t.num_gpus > 0 for t in fleet.models), "the example shows a model on a GPU worker"
    assert cfg["report"]["redact_ids"] is True and fleet.settings.retention is not None
