#!/usr/bin/env bash
# Installs this sovctl bundle with no network at all:
#   bash install [--venv DIR] [--python PYTHON] [--force]
# 1. checks every file against manifest.json (one changed byte: nothing is installed, exit 5);
# 2. creates a virtual environment (default: venv/ beside this script) and installs the
#    bundle's wheels into it: pip with no index, these wheels and these hashes only;
# 3. imports the models, sovctl.lock, sovctl.toml and the profiles into the home (SOVCTL_HOME,
#    else sovctl's default); --force replaces what the home already holds differently.
# A failed step removes the environment this run created: all or nothing.
#
# Written by `sovctl bundle create` (sovctl @SOVCTL_VERSION@) for Python @PYTHON@ on @PLATFORM@.
set -euo pipefail

BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WANT=@PYTHON@
VENV=$BUNDLE/venv
PYTHON=
FORCE=()

die() { echo "error: $1" >&2; exit "${2:-1}"; }
step() { echo "install: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --venv) [ $# -ge 2 ] || die "--venv needs a directory" 2; VENV=$2; shift 2 ;;
        --venv=*) VENV=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter" 2; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --force) FORCE=(--force); shift ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see bash $0 --help)" 2 ;;
    esac
done
T0=$(date +%s%N)

# The wheels are for one Python: its minor version must be the one they were made with.
if [ -z "$PYTHON" ]; then
    for candidate in "python$WANT" python3; do
        if command -v "$candidate" >/dev/null; then PYTHON=$candidate; break; fi
    done
fi
[ -n "$PYTHON" ] || die "no python$WANT or python3 found (give one with --python)" 2
HAVE=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || die "$PYTHON does not run" 2
[ "$HAVE" = "$WANT" ] || die "$PYTHON is Python $HAVE; this bundle's wheels are for Python \
$WANT (give one with --python)" 2

step "checking every file against manifest.json"
"$PYTHON" - "$BUNDLE" <<'PY'
import hashlib, json, sys, sysconfig
from pathlib import Path

root = Path(sys.argv[1])
def refuse(message, code):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)

try:
    doc = json.loads((root / "manifest.json").read_text())
except (OSError, ValueError) as e:
    refuse(f"{root}/manifest.json cannot be read ({e}): not a sovctl bundle", 4)
if doc.get("schema") != "sovctl.bundle/1":
    refuse(f"manifest.json has schema {doc.get('schema')!r}, this script reads "
           "'sovctl.bundle/1'", 3)
if doc["platform"]["platform"] != sysconfig.get_platform():
    refuse(f"this bundle is for {doc['platform']['platform']}, this machine is "
           f"{sysconfig.get_platform()}", 2)
bad, total = [], 0
for f in doc["files"]:
    h = hashlib.sha256()
    try:
        with open(root / f["path"], "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    except OSError as e:
        bad.append(f"{f['path']}: cannot be read ({e.strerror})")
        continue
    total += f["size"]
    if h.hexdigest() != f["sha256"]:
        bad.append(f"{f['path']}: sha256 {h.hexdigest()}, the manifest says {f['sha256']}")
for b in bad:
    print(f"error: damaged bundle file {b}", file=sys.stderr)
if bad:
    print("error: nothing was installed: the bundle was damaged or altered after it was "
          "made (copy it again from its source)", file=sys.stderr)
    sys.exit(5)
print(f"install: {len(doc['files'])} files, {total / 2**20:.1f} MiB, match manifest.json",
      file=sys.stderr)
PY

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ] && [ -n "$(ls -A "$VENV")" ]; then
    die "$VENV exists and is not a virtual environment (choose another --venv)" 2
fi
CREATED=
[ -e "$VENV" ] || CREATED=1
DONE=
undo() { if [ -n "$CREATED" ] && [ -z "$DONE" ]; then rm -rf "$VENV"; fi; }
trap undo EXIT

# pip sees the bundle and nothing else: no configuration file, no PIP_* variable, no cache.
for var in $(compgen -e); do
    case $var in PIP_*) unset "$var" ;; esac
done
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

step "creating $VENV"
"$PYTHON" -m venv "$VENV"
step "installing $(grep -c '==' "$BUNDLE/requirements.txt") wheels (no index)"
"$VENV/bin/python" -m pip install --quiet --no-index --no-cache-dir --only-binary :all: \
    --find-links "$BUNDLE/wheels" --require-hashes -r "$BUNDLE/requirements.txt"
step "importing the models and settings into the home"
"$VENV/bin/sovctl" bundle import "$BUNDLE" ${FORCE[@]+"${FORCE[@]}"}
DONE=1
MS=$(( ($(date +%s%N) - T0) / 1000000 ))
step "done in $((MS / 1000)).$((MS % 1000 / 100)) s (measured): $VENV/bin/sovctl serve starts \
the stack"
