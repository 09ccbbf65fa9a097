#!/usr/bin/env bash
# What a device call carries: the tracked tree, untracked files git does not ignore, and the
# ignored paths named in `carry`, 64 MiB in all. The tracked tree is ~83 MiB, ~80 of it the
# fixtures (tests/fixtures/tiny ~49, tests/fixtures/extra ~30), so a GPU session untracks them
# for its device calls and carries the part the call needs instead:
#   bash scripts/gpu-travel.sh shrink    untrack tests/fixtures/{tiny,extra} (the files stay on
#                                        disk), ignore them in .git/info/exclude, and refuse
#                                        commits (a pre-commit hook) until restored
#   bash scripts/gpu-travel.sh size P..  MiB that would travel with `carry` = P..; fails over 64
#   bash scripts/gpu-travel.sh restore   track them again exactly as HEAD has them; drop the
#                                        exclude lines and the hook
# Shrinking stages the fixtures' removal in the index: nothing may be committed until restore.
set -euo pipefail
cd "$(dirname "$0")/.."
PATHS=(tests/fixtures/tiny tests/fixtures/extra)
MARK="# kstyle gpu-travel: scripts/gpu-travel.sh restore removes this block"
EXCLUDE=$(git rev-parse --git-path info/exclude)
HOOK=$(git rev-parse --git-path hooks/pre-commit)
LIMIT_MIB=64

shrunk() { [ -f "$EXCLUDE" ] && grep -qxF "$MARK" "$EXCLUDE"; }

# Apparent bytes (hard links counted each time, as a copy would) of what travels with `carry`.
travel_mib() {
    python3 - "$@" <<'EOF'
import os, subprocess, sys
def files(args):
    out = subprocess.run(["git", "ls-files", "-z", *args], check=True, capture_output=True).stdout
    return [p for p in out.decode().split("\0") if p]
total = 0
for p in files([]) + files(["--others", "--exclude-standard"]):
    if os.path.isfile(p) and not os.path.islink(p):
        total += os.path.getsize(p)
for c in sys.argv[1:]:
    if os.path.isfile(c):
        total += os.path.getsize(c)
    for root, _, names in os.walk(c):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names
                     if not os.path.islink(os.path.join(root, n)))
print(f"{total / 2**20:.1f}")
EOF
}

case "${1:-}" in
shrink)
    if shrunk; then
        echo "already shrunk (restore with: bash scripts/gpu-travel.sh restore)"
        exit 0
    fi
    if ! git diff --cached --quiet; then
        echo "refusing: the index has staged changes; commit or unstage them first" >&2
        exit 1
    fi
    if [ -e "$HOOK" ]; then
        echo "refusing: $HOOK exists; this script installs its own guard there" >&2
        exit 1
    fi
    git rm -r -q --cached "${PATHS[@]}"
    mkdir -p "$(dirname "$EXCLUDE")" "$(dirname "$HOOK")"
    {
        echo "$MARK"
        for p in "${PATHS[@]}"; do echo "/$p/"; done
        echo "$MARK"
    } >> "$EXCLUDE"
    cat > "$HOOK" <<'EOF'
#!/bin/sh
echo "commit refused: the fixtures are untracked for a device call; run: bash scripts/gpu-travel.sh restore" >&2
exit 1
EOF
    chmod +x "$HOOK"
    echo "shrunk: the tracked tree travels as $(travel_mib) MiB; name what a call needs in carry."
    echo "restore before any commit: bash scripts/gpu-travel.sh restore"
    ;;
size)
    shift
    mib=$(travel_mib "$@")
    echo "$mib MiB would travel (limit $LIMIT_MIB) with carry: ${*:-nothing}"
    python3 -c "import sys; sys.exit(float(sys.argv[1]) > $LIMIT_MIB)" "$mib"
    ;;
restore)
    git reset -q HEAD -- "${PATHS[@]}"
    if shrunk; then
        python3 - "$EXCLUDE" "$MARK" <<'EOF'
import sys
path, mark = sys.argv[1], sys.argv[2]
lines = open(path).read().split("\n")
marks = [i for i, l in enumerate(lines) if l == mark]
if len(marks) >= 2:
    del lines[marks[0] : marks[1] + 1]
open(path, "w").write("\n".join(lines))
EOF
    fi
    if [ -f "$HOOK" ] && grep -q "gpu-travel.sh restore" "$HOOK"; then rm -f "$HOOK"; fi
    left=$(git status --short -- "${PATHS[@]}")
    if [ -n "$left" ]; then
        echo "restored the index, but the fixtures differ from HEAD:" >&2
        echo "$left" >&2
        exit 1
    fi
    echo "restored: the fixtures are tracked as HEAD has them"
    ;;
*)
    echo "usage: scripts/gpu-travel.sh shrink | size [CARRY...] | restore" >&2
    exit 2
    ;;
esac
