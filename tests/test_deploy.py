"""The Kubernetes manifests and the Dockerfiles, checked offline.

Manifests: every document validates against the Kubernetes OpenAPI schemas bundled with
``kubernetes-validate`` (strict: unknown fields fail), and the pieces agree with each other and
with the server (the container's arguments parse as ``esmc serve`` flags, probes hit the
health port, the drain fits the termination grace period, selectors match the pods).
Dockerfiles: the base image a build argument whose default is pinned, stages in the order
dependencies -> wheel -> image (the image copies the venv and installs the wheel, never the
build context), pip's index left to the build, every file they copy exists and is not
docker-ignored, and torch is the documented version from the documented index.
deploy/container/check.sh builds and runs them.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from esmc_server.cli import build_parser, config_from_args  # noqa: E402
from esmc_server.metrics import Metrics  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.30.0", "1.37.0")  # oldest supported minor with native gRPC probes GA, newest
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")


def documents() -> dict[tuple[str, str], dict]:
    """``{(kind, name): resource}`` of every manifest in deploy/kubernetes."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = documents()
    assert {kind for kind, _ in docs} == {
        "Deployment", "Service", "PodDisruptionBudget", "Secret", "HorizontalPodAutoscaler"
    }
    for (kind, name), doc in docs.items():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error


def test_the_validator_catches_mistakes():
    deployment = documents()[("Deployment", "esmc")]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grpc"]["prot"] = container["livenessProbe"]["grpc"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def _container(docs) -> dict:
    (container,) = docs[("Deployment", "esmc")]["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_agrees_with_the_server_and_the_services():
    docs = documents()
    deployment = docs[("Deployment", "esmc")]
    pod = deployment["spec"]["template"]["spec"]
    container = _container(docs)
    env = {e["name"]: e["value"] for e in container["env"]}
    # the arguments are esmc serve flags, and the env the settings it reads
    args = build_parser().parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.health_port == ports["health"]
    assert ports["grpc"] == 50051 and ports["metrics"] == 9090  # the image's ENTRYPOINT ports
    grace_s = float(env["ESMC_GRACE_S"])
    # probes: native gRPC on the plaintext health port; readiness asks for the ESMC service
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "esmc.v1.ESMC"
    # drain: preStop sleep + the server's grace fit in the termination grace period
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert float(command[1]) + grace_s + 5 <= pod["terminationGracePeriodSeconds"]
    # non-root, read-only root filesystem; writable places are volumes
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts and env["HF_HOME"].startswith("/cache") and "/cache" in mounts
    # a GPU each; files from the Secrets where the flags point
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mount_of = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for flag, value in (("tls_cert", args.tls_cert), ("tls_key", args.tls_key),
                        ("tls_client_ca", args.tls_client_ca),
                        ("auth_tokens_file", args.auth_tokens_file)):
        volume = next(n for n, path in mount_of.items() if value.startswith(path + "/"))
        secret = docs[("Secret", secrets[volume])]
        assert Path(value).name in secret["stringData"], flag
    # selectors
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("Service", "esmc"), ("Service", "esmc-headless")):
        assert docs[(kind, name)]["spec"]["selector"].items() <= labels.items()
    pdb = docs[("PodDisruptionBudget", "esmc")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs[("Service", "esmc-headless")]["spec"]["clusterIP"] == "None"
    for service in ("esmc", "esmc-headless"):
        for port in docs[("Service", service)]["spec"]["ports"]:
            assert port["targetPort"] in ports
    # the settings as the server reads them (flags and ESMC_* env together)
    import os

    old = dict(os.environ)
    try:
        os.environ.update(env)
        config = config_from_args(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert config.tls and config.tls_client_ca and config.auth_tokens_file
    assert config.grace_s == grace_s and config.max_connection_age_s == 300
    # stopping: preStop sleep, then SIGTERM's drain delay and grace, inside the pod's period
    sleep_s = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    stop_s = sleep_s + config.drain_delay_s + config.grace_s
    assert stop_s + 5 <= pod["terminationGracePeriodSeconds"]


def test_hpa_scales_the_deployment_on_a_metric_the_server_exports():
    docs = documents()
    hpa = docs[("HorizontalPodAutoscaler", "esmc")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "esmc"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {family.name for family in Metrics().registry.collect()}
    assert name in exported
    pdb = docs[("PodDisruptionBudget", "esmc")]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


# --- Dockerfiles ------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    out = []
    for line in lines:
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def build_args(instructions) -> dict[str, str]:
    return dict(
        rest.split("=", 1) for instruction, rest in instructions if instruction == "ARG" and "=" in rest
    )


def stages(instructions) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (each FROM starts one)."""
    out: list[list[tuple[str, str]]] = []
    for instruction, rest in instructions:
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, rest))
    return out


def readme_commands() -> set[str]:
    """Every command of the bash blocks of the README and docs/*.md (split at ``&&``,
    comments dropped)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for command in line.split("&&"):
                if command.strip():
                    try:
                        commands.add(" ".join(shlex.split(command)))
                    except ValueError:  # a line continued elsewhere (quotes across lines)
                        commands.add(command.strip())
    return commands


def dockerignored(relative: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides
    (``!pattern`` keeps it)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        if any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(Path(prefix).name, pattern)
               for prefix in prefixes):
            ignored = not keep
    return ignored


def test_dockerignore_keeps_the_project_and_leaves_out_the_rest():
    for kept in ("pyproject.toml", "README.md", "esmc/shipped/esmc-tiny.safetensors",
                 "server/esmc_server/app.py", "client/esmc_client/client.py", "protos/esmc_proto"):
        assert not dockerignored(kept), kept
    for left_out in (".git", ".venv", "tests/test_deploy.py", "benchmarks", "deploy/kubernetes",
                     "server/esmc_server/__pycache__/app.cpython-311.pyc", "runs/x.npz"):
        assert dockerignored(left_out), left_out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_is_pinned_layered_copies_what_exists_and_installs_what_the_readme_says(name):
    instructions = dockerfile_instructions(ROOT / name)
    args = build_args(instructions)
    # the base image is a build argument whose default is a pinned official image
    base = args["BASE_IMAGE"]
    _image, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag), base
    deps, wheel, final = stages(instructions)
    assert deps[0] == ("FROM", "${BASE_IMAGE} AS deps") and final[0] == ("FROM", "${BASE_IMAGE}")
    assert wheel[0] == ("FROM", "deps AS wheel")
    # the package index is the build's: pip's settings are build arguments of the stages
    # that download, and none of them is an ENV (which would stay in the image)
    for stage in (deps, wheel):
        declared = {rest for instruction, rest in stage if instruction == "ARG"}
        assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE"} <= declared
    env = " ".join(rest for instruction, rest in instructions if instruction == "ENV")
    assert "PIP_INDEX_URL" not in env and "PIP_CONFIG_FILE" not in env
    # dependencies before the source: the deps stage copies pyproject.toml alone
    copies = [rest for instruction, rest in deps if instruction == "COPY"]
    assert copies == ["pyproject.toml /src/pyproject.toml"]
    # the image gets the venv and the wheel from the stages, never the build context
    assert [rest for instruction, rest in final if instruction == "COPY"] == [
        "--from=deps /opt/venv /opt/venv"
    ]
    assert any("from=wheel" in rest and "--no-index" in rest for i, rest in final if i == "RUN")
    assert ("USER", "esmc") in final
    # COPY sources exist and are in the build context
    for instruction, rest in instructions:
        if instruction == "COPY" and not rest.startswith("--from"):
            *sources, _destination = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not dockerignored(source), source
    # what building the wheel needs is in the build context
    pyproject = (ROOT / "pyproject.toml").read_text()
    needed = ["pyproject.toml", "README.md", "esmc/shipped/esmc-tiny.safetensors"]
    needed += re.findall(r'"(?:esmc|esmc_server|esmc_client|esmc_proto|esmc_ray)" = "([^"]+)"', pyproject)
    copied = {source for i, rest in wheel if i == "COPY" for source in shlex.split(rest)[:-1]}
    for relative in needed:
        assert (ROOT / relative).exists() and not dockerignored(relative), relative
        assert {relative, relative.split("/")[0]} & copied, relative
    # torch is the documented version from the documented index
    commands = readme_commands()
    (torch,) = [rest for instruction, rest in deps if instruction == "RUN" and "torch==" in rest]
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], torch.removeprefix("RUN "))
    assert " ".join(shlex.split(expanded)) in commands
    pins = set(re.findall(r"torch==([\d.]+)", "\n".join(commands)))
    assert pins == {args["TORCH_VERSION"]}, pins


def test_cpu_image_serves_the_shipped_model_offline():
    instructions = dockerfile_instructions(ROOT / "Dockerfile.cpu")
    env = " ".join(rest for instruction, rest in instructions if instruction == "ENV")
    assert "ESMC_MODEL=esmc-tiny" in env and "HF_HUB_OFFLINE=1" in env
    assert "whl/cpu" in build_args(instructions)["TORCH_INDEX_URL"]
    entry = [rest for instruction, rest in instructions if instruction == "ENTRYPOINT"][-1]
    argv = yaml.safe_load(entry)  # a JSON array
    assert argv[:2] == ["esmc", "serve"]
    build_parser().parse_args(argv[2:])  # the flags exist
