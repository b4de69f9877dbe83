#!/usr/bin/env bash
# Build both images without a Docker daemon and run the CPU one as a container would.
#
#   sudo deploy/container/check.sh            # as root: apt-get, mmdebstrap, buildah, mounts
#
# 1. Installs buildah and mmdebstrap (Debian packages) when missing.
# 2. Makes two local Debian bookworm bases with mmdebstrap: one with Python 3.11 and its venv
#    module (stands in for python:3.11.11-slim-bookworm), one minimal with apt and no Python
#    (stands in for the CUDA runtime image, which has no Python either).
# 3. Builds Dockerfile.cpu on the first with `buildah bud --isolation chroot`, and Dockerfile
#    on the second with the CPU build of torch instead of the CUDA one.
# 4. For each image: prints its size and layers, checks that it is lean (no compiler, no pip
#    or apt caches, no source tree), then runs its ENTRYPOINT as its USER with its ENV, on a
#    read-only root filesystem with a tmpfs /tmp (as deploy/kubernetes asks), no new
#    privileges, and calls it from outside over loopback (deploy/container/probe.py):
#    health, Info, Logits, /metrics, then SIGTERM with a Generate stream in flight, which
#    must finish while health says NOT_SERVING; the server must exit 0.
#
# What the run does not reproduce: the network namespace (the server shares the host's, so
# it listens on 127.0.0.1 and ports picked here, given as flags after the entrypoint as
# `docker run IMAGE --port ...` would); cgroup limits; seccomp; a PID namespace; dropped
# capabilities other than by being a non-root user.
#
# Settings (environment): TORCH_INDEX_URL (default: a local index made from the wheel that
# this machine's pip resolves for torch==TORCH_VERSION, which must be a CPU build),
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (passed as build arguments), ESMC_CHECK_WORK (scratch,
# default /var/tmp/esmc-image-check), ESMC_CHECK_ONLY=cpu (skip the CUDA Dockerfile).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${ESMC_CHECK_WORK:-/var/tmp/esmc-image-check}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' "$ROOT/Dockerfile.cpu")
mkdir -p "$WORK"
say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

need() {  # install Debian packages whose command is missing
    local missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if ((${#missing[@]})); then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

make_base() {  # NAME TAG INCLUDES: a bookworm root filesystem imported as localhost/NAME:TAG
    local name=$1 tag=$2 include=$3
    if buildah inspect --type image "localhost/$name:$tag" >/dev/null 2>&1; then
        echo "localhost/$name:$tag exists (remove it to remake it)"
        return
    fi
    local tarball="$WORK/$name-$tag.tar"
    mmdebstrap --variant=minbase --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        bookworm "$tarball"
    local ctr
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$tarball" / >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["bash"]' "$ctr"
    buildah commit -q "$ctr" "localhost/$name:$tag" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -f "$tarball"
}

torch_index() {  # a local PEP 503 index with the CPU torch wheel and its dependencies
    local index="$MOUNTS/torch-index"
    if [ ! -f "$index/torch/index.html" ]; then
        rm -rf "$index" && mkdir -p "$index/files"
        pip download --only-binary=:all: --dest "$index/files" "torch==$TORCH_VERSION" >&2
        ls "$index/files" | grep -q "^torch-$TORCH_VERSION+cpu-" || {
            echo "this machine's pip did not resolve a CPU build of torch; set TORCH_INDEX_URL" >&2
            exit 1
        }
        python3 - "$index" <<'EOF'
import re, sys
from pathlib import Path
index = Path(sys.argv[1])
projects = {}
for wheel in sorted((index / "files").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel.name)
for name, wheels in projects.items():
    (index / name).mkdir(exist_ok=True)
    links = "".join(f'<a href="../files/{w}">{w}</a>\n' for w in wheels)
    (index / name / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
EOF
    fi
    echo "$index"
}

build() {  # DOCKERFILE TAG BASE: build with buildah, timed
    local dockerfile=$1 tag=$2 base=$3 args=()
    args+=(--build-arg "BASE_IMAGE=$base")
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    else
        args+=(--build-arg "TORCH_INDEX_URL=file:///mnt/torch-index/")
    fi
    # pip inside the build trusts what pip here trusts (a proxy's CA): a mounted pip.conf.
    # The build's files are mounted on /mnt, which every base has: a mount point that did
    # not exist would stay in the image as an empty directory.
    args+=(--volume "$MOUNTS:/mnt:ro" --build-arg PIP_CONFIG_FILE=/mnt/pip/pip.conf)
    for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
        [ -z "${!name:-}" ] || args+=(--build-arg "$name=${!name}")
    done
    local start=$SECONDS
    buildah bud --isolation chroot --layers "${args[@]}" -f "$ROOT/$dockerfile" -t "$tag" "$ROOT"
    echo "built $tag from $dockerfile on $base in $((SECONDS - start)) s"
}

describe() {  # TAG: size and layers
    local tag=$1
    buildah images --format 'image {{.Name}}:{{.Tag}} {{.ID}} size {{.Size}}' "$tag"
    buildah inspect --type image "$tag" > "$WORK/inspect.json"
    python3 - "$WORK/inspect.json" <<'EOF'
import json, sys
inspect = json.load(open(sys.argv[1]))
config = inspect["OCIv1"]
layers = json.loads(inspect["Manifest"])["layers"]
steps = [h for h in config["history"] if not h.get("empty_layer")]
print(f"layers: {len(layers)} (size as stored, uncompressed tar)")
for layer, step in zip(layers, steps):
    made = step.get("created_by", "").replace("/bin/sh -c ", "").replace("#(nop) ", "")
    made = " ".join(made.split())
    print(f"  {layer['size'] / 1e6:9.1f} MB  {made[:110]}")
print("config: user", config["config"].get("User"), "| entrypoint", config["config"].get("Entrypoint"))
EOF
}

lean() {  # ROOTFS: what must not be in the image
    local rootfs=$1 found=0
    for path in usr/bin/gcc usr/bin/cc usr/bin/make usr/bin/g++ root/.cache/pip \
                home/esmc/.cache/pip src app wheels; do
        if [ -e "$rootfs/$path" ]; then echo "lean: FAIL /$path is in the image"; found=1; fi
    done
    if [ -n "$(ls -A "$rootfs/var/lib/apt/lists" 2>/dev/null | grep -v '^lock$\|^partial$' || true)" ]; then
        echo "lean: FAIL apt lists left in /var/lib/apt/lists"; found=1
    fi
    if ls "$rootfs"/var/cache/apt/archives/*.deb >/dev/null 2>&1; then
        echo "lean: FAIL .deb files left in /var/cache/apt/archives"; found=1
    fi
    local left
    left=$(cd "$rootfs" && find tmp mnt -mindepth 1 2>/dev/null | tr '\n' ' ')
    if [ -n "$left" ]; then echo "lean: FAIL left in the image: $left"; found=1; fi
    local tests
    tests=$(find "$rootfs/opt/venv" -path '*site-packages/esmc*' -name 'test_*.py' | wc -l)
    [ "$tests" -eq 0 ] || { echo "lean: FAIL project tests in the image"; found=1; }
    [ "$found" -eq 0 ] && echo "lean: no compiler, no make, no pip/apt caches, no source tree or tests, /tmp and /mnt empty"
    echo "lean: /opt/venv $(du -sh "$rootfs/opt/venv" | cut -f1), of which torch $(du -sh "$rootfs"/opt/venv/lib/python3*/site-packages/torch | cut -f1)"
    return $found
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_image() {  # TAG [extra args for the entrypoint]: run it read-only, as its user, and probe it
    local tag=$1; shift
    local ctr rootfs port metrics status=0
    ctr=$(buildah from -q "$tag")
    rootfs=$(buildah mount "$ctr")
    lean "$rootfs" || status=1
    buildah inspect --type image "$tag" \
        | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["OCIv1"]["config"], sys.stdout)' \
        > "$WORK/run.json"
    port=$(free_port); metrics=$(free_port)
    # argv: ENTRYPOINT, then the flags a `docker run IMAGE ...` would append; env: the image's
    # ENV plus the drain timings the Kubernetes manifest sets (shortened).
    mapfile -t argv < <(python3 -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["Entrypoint"]))' "$WORK/run.json")
    mapfile -t envv < <(python3 -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["Env"]))' "$WORK/run.json")
    user=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["User"])' "$WORK/run.json")
    uid=$(chroot "$rootfs" id -u "$user"); gid=$(chroot "$rootfs" id -g "$user")
    argv+=(--host 127.0.0.1 --port "$port" --metrics-port "$metrics" "$@")
    envv+=(ESMC_DRAIN_DELAY_S=2 ESMC_GRACE_S=120 "HOME=/home/$user")
    echo "run: as $user ($uid:$gid), root filesystem read-only, tmpfs /tmp, no_new_privs"
    echo "run: ${argv[*]}"
    # A private mount namespace: the image's root bound read-only, /proc, a minimal /dev, a
    # tmpfs /tmp; then chroot into it as the image's user. unshare execs (no fork), so the
    # server keeps this PID and gets the SIGTERM itself.
    unshare --mount --propagation private -- bash -c '
        set -e; r=$1; shift
        mount --bind "$r" "$r"; mount -o remount,bind,ro "$r"
        mount -t proc proc "$r/proc"
        mount -t tmpfs -o size=1m,mode=0755 tmpfs "$r/dev"
        for d in null zero full random urandom; do touch "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done
        mkdir "$r/dev/shm"; mount -t tmpfs -o size=64m,mode=1777 tmpfs "$r/dev/shm"
        mount -t tmpfs -o size=1g,mode=1777 tmpfs "$r/tmp"
        uidgid=$1; shift
        exec setpriv --no-new-privs chroot --userspec="$uidgid" "$r" /usr/bin/env -i "$@"
    ' _ "$rootfs" "$uid:$gid" "${envv[@]}" "${argv[@]}" > "$WORK/server.log" 2>&1 &
    local pid=$!
    if ! python3 "$ROOT/deploy/container/probe.py" --port "$port" --metrics-port "$metrics" --pid "$pid"; then
        status=1; kill "$pid" 2>/dev/null || true
    fi
    local rc=0
    wait "$pid" || rc=$?
    echo "run: the server exited with status $rc"
    [ "$rc" -eq 0 ] || status=1
    echo "run: server log (key lines):"
    grep -E 'serving |SERVING|shutting down|drain|stopped|Traceback|Error|error' "$WORK/server.log" \
        | sed -E 's/^[0-9-]+ [0-9:,]+ /  /' | head -20 || true
    buildah umount "$ctr" >/dev/null; buildah rm "$ctr" >/dev/null
    return $status
}

say "tools"
need buildah:buildah mmdebstrap:mmdebstrap setpriv:util-linux
buildah --version; mmdebstrap --version; uname -r
if ! python3 -c 'import esmc_client, grpc_health' 2>/dev/null; then  # the probe's client, no torch
    [ -x "$WORK/client-venv/bin/python" ] || {
        python3 -m venv "$WORK/client-venv" && "$WORK/client-venv/bin/pip" install -q "$ROOT"
    }
    PATH="$WORK/client-venv/bin:$PATH"
fi

say "bases (mmdebstrap bookworm)"
start=$SECONDS
make_base esmc-base python3.11-bookworm python3,python3-venv,ca-certificates,passwd
make_base esmc-base apt-bookworm ca-certificates,passwd
echo "bases ready in $((SECONDS - start)) s"
ctr=$(buildah from -q localhost/esmc-base:python3.11-bookworm)
buildah run --isolation chroot "$ctr" python3 --version
buildah rm "$ctr" >/dev/null
MOUNTS="$WORK/mnt"  # what the builds see at /mnt: pip.conf, the CA pip trusts, the torch index
mkdir -p "$MOUNTS/pip"
[ -n "${TORCH_INDEX_URL:-}" ] || torch_index >/dev/null
cp "$(python3 -c 'import pip._vendor.certifi as c, os; print(os.environ.get("PIP_CERT") or c.where())')" "$MOUNTS/pip/ca.crt"
printf '[global]\ncert = /mnt/pip/ca.crt\n' > "$MOUNTS/pip/pip.conf"

failed=0
say "build Dockerfile.cpu"
build Dockerfile.cpu localhost/esmc-serve:cpu localhost/esmc-base:python3.11-bookworm
say "image localhost/esmc-serve:cpu"
describe localhost/esmc-serve:cpu
say "run localhost/esmc-serve:cpu"
run_image localhost/esmc-serve:cpu || failed=1

if [ "${ESMC_CHECK_ONLY:-}" != cpu ]; then
    say "build Dockerfile (stand-in base: bookworm with apt, no CUDA; CPU torch)"
    build Dockerfile localhost/esmc-serve:cuda-standin localhost/esmc-base:apt-bookworm
    say "image localhost/esmc-serve:cuda-standin"
    describe localhost/esmc-serve:cuda-standin
    say "run localhost/esmc-serve:cuda-standin (esmc-tiny on the CPU)"
    run_image localhost/esmc-serve:cuda-standin --model esmc-tiny --device cpu || failed=1
fi

say "result"
if [ "$failed" -eq 0 ]; then echo "check: all passed"; else echo "check: FAILED"; fi
exit "$failed"
