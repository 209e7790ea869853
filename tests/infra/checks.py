"""Static checks of the files in infra/: small functions that return the problems they find.

Each ``*_problems`` function returns a list of readable sentences, empty when all is well, so
that a test shows every problem of a file at once and a negative test can match the sentence.
Nothing here needs a network, a cluster, Docker or kubectl.
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import re
import shlex
from collections.abc import Iterator

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def rel(path: pathlib.Path) -> str:
    """The path relative to the repository root, for messages."""
    return str(path.relative_to(ROOT))


def load_yaml_docs(path: pathlib.Path) -> list:
    """Every document of a (possibly multi-document) YAML file, empty documents left out."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def get(obj, dotted: str, problems: list[str], where: str):
    """``obj["a"]["b"]`` for ``"a.b"``; a missing field is recorded as a problem and gives None."""
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}: missing required field {dotted}")
            return None
        obj = obj[key]
    return obj


# -- cron ------------------------------------------------------------------------------------------

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
                ("day of week", 0, 7))
_CRON_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day of week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}


def cron_problems(expr: str) -> list[str]:
    """Problems of a five-field cron schedule as Kubernetes CronJobs accept it.

    Each field is a comma-separated list of ``*``, ``N``, ``N-M``, optionally ``/STEP``; months and
    weekdays may be names (JAN, MON). Time zones belong in ``spec.timeZone``, not in the schedule.

    >>> cron_problems("0 2 * * *")
    []
    """
    if not isinstance(expr, str):
        return [f"schedule must be a string, got {expr!r}"]
    fields = expr.split()
    if fields and fields[0].startswith(("TZ=", "CRON_TZ=")):
        return [f"schedule {expr!r}: put the time zone in spec.timeZone, not in the schedule"]
    if len(fields) != 5:
        return [f"schedule {expr!r} has {len(fields)} fields, a cron schedule has 5 "
                "(minute hour day-of-month month day-of-week)"]
    problems = []
    for text, (name, lo, hi) in zip(fields, _CRON_FIELDS):
        names = _CRON_NAMES.get(name, {})

        def value(v: str, name=name, names=names) -> int:
            if v.upper() in names:
                return names[v.upper()]
            if not v.isdigit():
                raise ValueError(f"{v!r} is not a number")
            return int(v)

        for item in text.split(","):
            base, _, step = item.partition("/")
            try:
                if step and (not step.isdigit() or int(step) < 1):
                    raise ValueError(f"step {step!r} must be a whole number >= 1")
                if base in ("*", "?"):
                    continue
                a, _, b = base.partition("-")
                first, last = value(a), value(b) if b else value(a)
                if not lo <= first <= last <= hi:
                    raise ValueError(f"{base!r} is outside {lo}-{hi} or decreasing")
            except ValueError as e:
                problems.append(f"schedule {expr!r}: {name} field {text!r}: {e}")
    return problems


# -- Kubernetes values -----------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}


def quantity(value) -> float:
    """A Kubernetes resource quantity ("500m", "8Gi", 2) as a number."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def dns_label_problems(name, where: str, max_len: int = 63) -> list[str]:
    """Kubernetes object names: lowercase letters, digits and '-', at most ``max_len`` characters."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        return [f"{where}: name {name!r} must be lowercase letters, digits and '-'"]
    if len(name) > max_len:
        return [f"{where}: name {name!r} is longer than {max_len} characters"]
    return []


def image_problems(image, where: str) -> list[str]:
    """An image reference must name a fixed version: a tag other than 'latest', or a digest."""
    if not isinstance(image, str) or not image:
        return [f"{where}: no image"]
    if "@sha256:" in image:
        return []
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return [f"{where}: image {image!r} has no tag (it would mean 'latest')"]
    if name.rsplit(":", 1)[1] == "latest":
        return [f"{where}: image {image!r} is tagged 'latest'; pin a version"]
    return []


GPU = "nvidia.com/gpu"


def container_problems(c: dict, where: str, *, gpu: bool) -> list[str]:
    """A container: name, pinned image, requests <= limits, and a GPU limit exactly when ``gpu``."""
    problems: list[str] = []
    where = f"{where} container {c.get('name', '?')!r}"
    if not c.get("name"):
        problems.append(f"{where}: missing name")
    problems += image_problems(c.get("image"), where)
    requests = get(c, "resources.requests", problems, where) or {}
    limits = get(c, "resources.limits", problems, where) or {}
    for key in ("cpu", "memory"):
        if key not in limits:
            problems.append(f"{where}: no {key} limit")
    for key, req in requests.items():
        try:
            if key in limits and quantity(req) > quantity(limits[key]):
                problems.append(f"{where}: {key} request {req} exceeds its limit {limits[key]}")
        except ValueError as e:
            problems.append(f"{where}: {key}: {e}")
    if gpu:
        n = limits.get(GPU)
        if not isinstance(n, int) or n < 1:
            problems.append(f"{where}: a GPU worker needs an integer {GPU} limit >= 1, got {n!r}")
        elif GPU in requests and requests[GPU] != n:
            problems.append(f"{where}: {GPU} request {requests[GPU]} must equal its limit {n}")
    elif GPU in limits or GPU in requests:
        problems.append(f"{where}: asks for {GPU} but is not a GPU container")
    return problems


def pod_template_problems(template, where: str, *, gpu: bool) -> list[str]:
    """A pod template: containers (the first is Ray's) that run as a non-root user."""
    problems: list[str] = []
    containers = get(template, "spec.containers", problems, where)
    if not containers:
        return problems or [f"{where}: spec.containers is empty"]
    pod_ctx = template["spec"].get("securityContext", {})
    for c in containers:
        problems += container_problems(c, where, gpu=gpu)
        ctx = {**pod_ctx, **c.get("securityContext", {})}
        if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser", 1) == 0:
            problems.append(f"{where} container {c.get('name')!r}: must run as non-root (runAsNonRoot: true)")
    return problems


def _ray_start_params_problems(params, where: str) -> list[str]:
    if not isinstance(params, dict):
        return [f"{where}: rayStartParams must be a mapping, got {params!r}"]
    return [f"{where}: rayStartParams.{k} must be a string (KubeRay rejects {v!r})"
            for k, v in params.items() if not isinstance(v, str)]


HEAD_MEMORY = 16 * 2**30      # the drivers run on the head: a LOO driver gathers the n × p parameter table
SERVICE_ACCOUNT = "deltagrad-ray"


def ray_pod_problems(template, params, where: str, *, head: bool) -> list[str]:
    """A Ray pod's memory: /dev/shm (an in-memory emptyDir) large enough for the object store set in
    ``rayStartParams.object-store-memory``, both inside the memory limit; the head sized for the
    drivers; the service account of IRSA."""
    problems: list[str] = []
    spec = (template or {}).get("spec", {}) if isinstance(template, dict) else {}
    if spec.get("serviceAccountName") != SERVICE_ACCOUNT:
        problems.append(f"{where}: serviceAccountName must be {SERVICE_ACCOUNT!r} (IRSA: its role gives S3 access), "
                        f"got {spec.get('serviceAccountName')!r}")
    containers = spec.get("containers") or [{}]
    ray_c = containers[0]
    mounts = {m.get("mountPath"): m.get("name") for m in ray_c.get("volumeMounts", [])}
    volumes = {v.get("name"): v for v in spec.get("volumes", [])}
    shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir")
    if not isinstance(shm, dict) or shm.get("medium") != "Memory":
        return problems + [f"{where}: no in-memory emptyDir at /dev/shm for Ray's object store "
                           "(the container default is 64 MB)"]
    try:
        limit = quantity(ray_c.get("resources", {}).get("limits", {}).get("memory", 0))
        size = quantity(shm.get("sizeLimit", 0))
        store = quantity((params or {}).get("object-store-memory", 0))
    except ValueError as e:
        return problems + [f"{where}: {e}"]
    if not store:
        problems.append(f"{where}: set rayStartParams.object-store-memory (Ray's default, 30% of the pod's memory, "
                        "need not fit /dev/shm)")
    elif not store <= size:
        problems.append(f"{where}: the object store ({store / 2**30:g} GiB) does not fit /dev/shm "
                        f"(sizeLimit {shm.get('sizeLimit')})")
    if not 0 < size < limit:
        problems.append(f"{where}: /dev/shm sizeLimit {shm.get('sizeLimit')} must be set and below the memory limit "
                        f"(it counts as the pod's memory)")
    if head and limit < HEAD_MEMORY:
        problems.append(f"{where}: head memory {ray_c.get('resources', {}).get('limits', {}).get('memory')} is below "
                        f"{HEAD_MEMORY // 2**30}Gi: the drivers run on the head")
    return problems


def raycluster_spec_problems(spec, where: str, *, ray_version: str) -> list[str]:
    """A RayCluster spec (also a RayJob's rayClusterSpec): head group, GPU worker groups, token auth."""
    problems: list[str] = []
    if not isinstance(spec, dict):
        return [f"{where}: spec must be a mapping"]
    if spec.get("rayVersion") != ray_version:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} differs from the project's Ray {ray_version}")
    if get(spec, "authOptions.mode", problems, where) not in (None, "token"):
        problems.append(f"{where}: authOptions.mode must be 'token'")
    head = get(spec, "headGroupSpec", problems, where) or {}
    params = get(head, "rayStartParams", problems, f"{where}.headGroupSpec")
    if params is not None:
        problems += _ray_start_params_problems(params, f"{where}.headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: head serviceType {head['serviceType']!r} exposes the dashboard; use ClusterIP")
    problems += pod_template_problems(get(head, "template", problems, f"{where}.headGroupSpec"),
                                      f"{where}.headGroupSpec", gpu=False)
    problems += ray_pod_problems(head.get("template"), head.get("rayStartParams"), f"{where}.headGroupSpec",
                                 head=True)
    groups = get(spec, "workerGroupSpecs", problems, where) or []
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{i}]"
        problems += dns_label_problems(get(g, "groupName", problems, w), w)
        counts = [get(g, k, problems, w) for k in ("minReplicas", "replicas", "maxReplicas")]
        if all(isinstance(n, int) for n in counts):
            lo, n, hi = counts
            if not 0 <= lo <= n <= hi or hi < 1:
                problems.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1; "
                                f"got {counts}")
        elif None not in counts:
            problems.append(f"{w}: replica counts must be integers, got {counts}")
        params = get(g, "rayStartParams", problems, w)
        if params is not None:
            problems += _ray_start_params_problems(params, w)
        problems += pod_template_problems(get(g, "template", problems, w), w, gpu=True)
        problems += ray_pod_problems(g.get("template"), g.get("rayStartParams"), w, head=False)
    return problems


def _kind_problems(doc, api_version: str, kind: str, where: str, max_name: int = 63) -> list[str]:
    problems: list[str] = []
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    if doc.get("apiVersion") != api_version or doc.get("kind") != kind:
        problems.append(f"{where}: expected apiVersion {api_version} kind {kind}, "
                        f"got {doc.get('apiVersion')} {doc.get('kind')}")
    problems += dns_label_problems(get(doc, "metadata.name", problems, where), where, max_name)
    return problems


def serviceaccount_problems(doc, where: str) -> list[str]:
    """The Ray pods' ServiceAccount: the name they use, the IRSA role annotation, no API token."""
    problems = _kind_problems(doc, "v1", "ServiceAccount", where)
    if get(doc, "metadata.name", problems, where) not in (None, SERVICE_ACCOUNT):
        problems.append(f"{where}: the Ray pods use the service account {SERVICE_ACCOUNT!r}")
    arn = (doc.get("metadata", {}).get("annotations") or {}).get("eks.amazonaws.com/role-arn", "")
    if not re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", str(arn)):
        problems.append(f"{where}: annotation eks.amazonaws.com/role-arn must be an IAM role ARN, got {arn!r}")
    if doc.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken must be false (the pods need no Kubernetes API)")
    return problems


def raycluster_problems(doc, where: str, *, ray_version: str) -> list[str]:
    """A KubeRay RayCluster (ray.io/v1)."""
    return (_kind_problems(doc, "ray.io/v1", "RayCluster", where)
            + raycluster_spec_problems(doc.get("spec"), f"{where} spec", ray_version=ray_version))


RAYJOB_SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")


def rayjob_problems(doc, where: str, *, ray_version: str) -> list[str]:
    """A KubeRay RayJob (ray.io/v1) that brings its own cluster and deletes it afterwards."""
    problems = _kind_problems(doc, "ray.io/v1", "RayJob", where)
    spec = get(doc, "spec", problems, where) or {}
    entrypoint = get(spec, "entrypoint", problems, where)
    if entrypoint is not None and (not isinstance(entrypoint, str) or not entrypoint.strip()):
        problems.append(f"{where}: spec.entrypoint must be a command")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: spec.shutdownAfterJobFinishes must be true (GPU nodes stay up otherwise)")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not isinstance(ttl, int) or ttl < 0:
        problems.append(f"{where}: spec.ttlSecondsAfterFinished must be an integer >= 0, got {ttl!r}")
    if spec.get("submissionMode", "K8sJobMode") not in RAYJOB_SUBMISSION_MODES:
        problems.append(f"{where}: spec.submissionMode {spec['submissionMode']!r} is not one of "
                        f"{RAYJOB_SUBMISSION_MODES}")
    if "runtimeEnvYAML" in spec and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
        problems.append(f"{where}: spec.runtimeEnvYAML must be a YAML mapping")
    problems += raycluster_spec_problems(get(spec, "rayClusterSpec", problems, where),
                                         f"{where} spec.rayClusterSpec", ray_version=ray_version)
    return problems


def cronjob_problems(doc, where: str) -> list[str]:
    """A batch/v1 CronJob whose runs never overlap and give up in bounded time."""
    problems = _kind_problems(doc, "batch/v1", "CronJob", where, max_name=52)
    spec = get(doc, "spec", problems, where) or {}
    schedule = get(spec, "schedule", problems, where)
    if schedule is not None:
        problems += cron_problems(schedule)
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"{where}: spec.concurrencyPolicy must be Forbid (two runs must not overlap), "
                        f"got {spec.get('concurrencyPolicy')!r}")
    for key in ("startingDeadlineSeconds", "jobTemplate.spec.backoffLimit", "jobTemplate.spec.activeDeadlineSeconds"):
        n = get(spec, key, problems, where)
        if n is not None and (not isinstance(n, int) or n < 0):
            problems.append(f"{where}: spec.{key} must be an integer >= 0, got {n!r}")
    template = get(spec, "jobTemplate.spec.template", problems, where) or {}
    if template.get("spec", {}).get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{where}: the pod's restartPolicy must be Never or OnFailure")
    problems += pod_template_problems(template, f"{where} jobTemplate", gpu=False)
    for c in template.get("spec", {}).get("containers", []):
        if not c.get("command") and not c.get("args"):
            problems.append(f"{where}: container {c.get('name')!r} has no command")
        problems += submitter_problems(c, f"{where} container {c.get('name')!r}")
    return problems


JOB_NAME_FIELD = "metadata.labels['batch.kubernetes.io/job-name']"


def submitter_problems(c: dict, where: str) -> list[str]:
    """The submitter: deltagrad_ray.jobs.submit with a submission id derived from the Job's name
    (which holds the scheduled time), not `ray job submit` (a second submission per retried pod,
    and exit 0 for a STOPPED job)."""
    words = [str(w) for w in c.get("command", []) + c.get("args", [])]
    if words[:3] == ["ray", "job", "submit"]:
        return [f"{where}: `ray job submit` submits again from every retried pod and exits 0 for a STOPPED job; "
                "use python -m deltagrad_ray.jobs.submit --job-name $(JOB_NAME)"]
    if words[:3] != ["python", "-m", "deltagrad_ray.jobs.submit"]:
        return [f"{where}: the command must be python -m deltagrad_ray.jobs.submit, got {' '.join(words[:3])!r}"]
    problems = []
    if "--job-name" not in words or words[words.index("--job-name") + 1] != "$(JOB_NAME)":
        problems.append(f"{where}: pass --job-name $(JOB_NAME): the submission id comes from the scheduled time")
    env = {e.get("name"): e for e in c.get("env", [])}
    if env.get("JOB_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != JOB_NAME_FIELD:
        problems.append(f"{where}: env JOB_NAME must come from fieldRef {JOB_NAME_FIELD}")
    return problems


# -- credentials -----------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|KEY_ID|CREDENTIAL|PRIVATE", re.I)
_LITERAL_SECRETS = (
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("a secret-looking assignment",
     re.compile(r"(?i)(secret|password|token|access_key)[\w-]*[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+]{20,}")),
)


def literal_secret_problems(text: str, where: str) -> list[str]:
    """Credentials written into a file (instead of coming from a Secret or an instance profile)."""
    return [f"{where}:{text.count(chr(10), 0, m.start()) + 1}: looks like {what} written literally"
            for what, pattern in _LITERAL_SECRETS for m in pattern.finditer(text)]


def env_lists(obj) -> Iterator[list]:
    """Every container ``env`` list anywhere in a manifest."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "env" and isinstance(v, list):
                yield v
            else:
                yield from env_lists(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from env_lists(v)


def env_secret_problems(doc, where: str) -> list[str]:
    """Environment variables that carry credentials must come from ``valueFrom.secretKeyRef``."""
    problems = []
    for env in env_lists(doc):
        for e in env:
            name = e.get("name", "")
            if _SECRET_NAME.search(name) and ("value" in e or "secretKeyRef" not in e.get("valueFrom", {})):
                problems.append(f"{where}: env {name} must come from valueFrom.secretKeyRef, not a literal value")
    return problems


# -- commands and the paths they name --------------------------------------------------------------

PATH_SUFFIXES = (".py", ".yaml", ".yml", ".txt", ".toml", ".sh", ".md", ".json", ".cfg")
# `kubectl port-forward svc/NAME`, `--from=cronjob/NAME`: Kubernetes objects, not paths
KUBECTL_KINDS = {"svc", "service", "secret", "job", "cronjob", "pod", "deployment", "configmap",
                 "rayjob", "raycluster", "namespace", "node"}
EXTERNAL_MODULES = {"pip"}


def shell_words(command: str) -> list[str]:
    """The words of a shell command; operators (; && | >) are words of their own, comments dropped."""
    lex = shlex.shlex(command, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def named_paths(command: str) -> list[str]:
    """Repository-relative paths a command names: words with a '/' or a file suffix.

    Absolute, home (~), variable ($) and URL words are not the repository's and are left out.
    """
    paths = []
    for w in shell_words(command):
        if w.startswith("-"):
            if "=" not in w:
                continue
            w = w.split("=", 1)[1]
        if not re.fullmatch(r"[\w.\-/]+", w) or w.startswith("/") or re.fullmatch(r"[\d.]+/\d+", w):
            continue  # not a relative path, or a CIDR range
        if w.split("/", 1)[0] in KUBECTL_KINDS and "/" in w:
            continue
        if "/" in w or w.endswith(PATH_SUFFIXES):
            paths.append(w)
    return paths


def named_modules(command: str) -> list[str]:
    """Modules a command runs with ``python -m MODULE``."""
    words = shell_words(command)
    return [words[i + 1] for i in range(1, len(words) - 1)
            if words[i] == "-m" and re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", words[i - 1])]


def module_file(module: str, root: pathlib.Path = ROOT) -> pathlib.Path | None:
    """The file that ``python -m module`` runs from the repository, if it exists."""
    base = root / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def missing_in_repo(command: str, *, roots: tuple[pathlib.Path, ...] = (ROOT,)) -> list[str]:
    """Paths and ``python -m`` modules a command names that the repository does not have."""
    problems = []
    for p in named_paths(command):
        if not any((r / p).exists() for r in roots):
            problems.append(f"path {p} does not exist")
    for m in named_modules(command):
        top = m.split(".")[0]
        if top in EXTERNAL_MODULES:
            continue
        if not (ROOT / top / "__init__.py").is_file():
            problems.append(f"module {m}: {top} is not a package of this repository")
        elif module_file(m) is None:
            problems.append(f"module {m}: no {m.replace('.', '/')}.py in the repository")
    return problems


def markdown_commands(text: str) -> list[str]:
    """The commands of a Markdown file's ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # comments (no '#' inside quotes here)
            if line:
                commands.append(line)
    return commands


def markdown_inline_code(text: str) -> list[str]:
    """The `inline code` spans of a Markdown file (outside fenced blocks), whitespace collapsed."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


# -- Dockerfile ------------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, args = full.partition(" ")
        instructions.append((word.upper(), args.strip()))
    return instructions


def _arg_defaults(instructions) -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)


def substitute(text: str, variables: dict[str, str]) -> str:
    """``${NAME}`` and ``$NAME`` replaced by their values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def base_images(instructions) -> list[str]:
    """The images of the FROM lines, with ARG defaults filled in."""
    defaults = _arg_defaults(instructions)
    images = []
    for instr, args in instructions:
        if instr == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            images.append(substitute(words[0], defaults))
    return images


def copy_sources(instructions) -> list[str]:
    """The build-context paths that COPY/ADD take (stage copies with --from= left out)."""
    sources = []
    for instr, args in instructions:
        if instr not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def env_settings(instructions) -> dict[str, str]:
    """The variables ENV sets (``ENV A=1 B=2`` form)."""
    env = {}
    for instr, args in instructions:
        if instr == "ENV":
            env.update(w.split("=", 1) for w in shlex.split(args) if "=" in w)
    return env


def final_user(instructions) -> str | None:
    users = [args.split(":")[0] for instr, args in instructions if instr == "USER"]
    return users[-1] if users else None


def workdir(instructions) -> str | None:
    dirs = [args for instr, args in instructions if instr == "WORKDIR"]
    return dirs[-1] if dirs else None


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether a .dockerignore pattern list leaves ``path`` (or a folder above it) out of the context."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    for pattern in patterns:
        p = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, p):
                return True
            if p.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], p[3:]):
                return True
    return False


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def dockerfile_problems(text: str, ignore_patterns: list[str], where: str) -> list[str]:
    """A Dockerfile: pinned base, COPY sources in the repository and in the context, non-root user,
    the environment the project expects, and RUN commands that only use files it copied."""
    instructions = dockerfile_instructions(text)
    problems: list[str] = []
    images = base_images(instructions)
    if not images:
        problems.append(f"{where}: no FROM")
    for image in images:
        problems += image_problems(image, f"{where} FROM")
    sources = copy_sources(instructions)
    for src in sources:
        if not (ROOT / src).exists():
            problems.append(f"{where}: COPY source {src} does not exist in the repository")
        elif ignored(src, ignore_patterns):
            problems.append(f"{where}: COPY source {src} is excluded by the .dockerignore file")
    user = final_user(instructions)
    if user in (None, "root", "0"):
        problems.append(f"{where}: the image must end with a non-root USER, got {user!r}")
    env = env_settings(instructions)
    if env.get("OMP_WAIT_POLICY") != "PASSIVE":
        problems.append(f"{where}: ENV OMP_WAIT_POLICY=PASSIVE is missing")
    if env.get("RAY_AUTH_MODE") not in ("token", "disabled"):
        problems.append(f"{where}: ENV RAY_AUTH_MODE must be set explicitly (token or disabled)")
    if not (workdir(instructions) or "").startswith("/"):
        problems.append(f"{where}: WORKDIR must be an absolute path")
    for instr, args in instructions:
        if instr != "RUN":
            continue
        for p in named_paths(args):
            if not any(p == s.rstrip("/") or p.startswith(s.rstrip("/") + "/") for s in sources):
                problems.append(f"{where}: RUN uses {p}, which no COPY puts into the image")
            elif not (ROOT / p).exists():
                problems.append(f"{where}: RUN uses {p}, which does not exist in the repository")
    return problems
