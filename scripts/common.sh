# Shared by scripts/quickstart and scripts/test (sourced, not run).
#
# Everything comes from Debian 12's apt for /usr/bin/python3, the
# interpreter nbdkit's python plugin embeds (libpython3.11); our package is
# installed for that interpreter in editable mode, so /usr/local/bin/zramd
# and nbdkit both see this clone.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=/usr/bin/python3

# What serving and attaching a device needs.
# gcc, python3-dev, liblz4-dev and libzstd-dev build zramd._fastpath (C);
# its zlib1g-dev comes with python3-dev (libpython3.11-dev depends on it).
# nbdkit-plugin-dev (nbdkit-filter.h) builds zramd's nbdkit filter.
RUNTIME_PACKAGES=(
    nbdkit nbdkit-plugin-python nbdkit-plugin-dev libnbd-bin python3-libnbd
    python3-zstandard liblzo2-2 python3-pip python3-setuptools
    gcc python3-dev liblz4-dev libzstd-dev
    qemu-utils fio fuse3 e2fsprogs util-linux mount kmod
)
# What the test suite needs on top (python3-lz4: a second lz4 encoder
# for the format tests).
TEST_PACKAGES=(python3-pytest python3-hypothesis python3-pytest-timeout
               python3-lz4 systemd)
# What the KVM rig (vm/rig) needs on the host: qemu to boot the guest,
# mmdebstrap to build its image.
RIG_PACKAGES=(qemu-system-x86 mmdebstrap)

say() { printf '%s\n' "$*" >&2; }
die() { say "zramd: $*"; exit 1; }

# Prints the packages of "$@" that are not installed.
missing_packages() {
    local pkg status
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) || status=
        [ "$status" = installed ] || printf '%s\n' "$pkg"
    done
}

# Installs the missing ones; runs apt-get update only when some are missing.
ensure_packages() {
    local missing
    mapfile -t missing < <(missing_packages "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "run as root to install: ${missing[*]}"
    say "zramd: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Installs this clone for /usr/bin/python3 (editable), unless it already
# is and its C extension is newer than every C source and header.
install_zramd() {
    local found built= so src stale=
    found=$(cd / && "$PYTHON" -c 'import zramd; print(zramd.__file__)' 2>/dev/null) || found=
    for so in "$REPO"/zramd/_fastpath.*.so; do
        [ -e "$so" ] && built=$so
    done
    # The filter must be there too, built for the nbdkit installed now
    # (nbdkit loads only a filter built against its own version): one it
    # refuses, say after an upgrade of nbdkit, is built again.
    ls "$REPO"/zramd/_nbdkit_filter.*.so >/dev/null 2>&1 || stale=1
    for so in "$REPO"/zramd/_nbdkit_filter.*.so; do
        [ -e "$so" ] || continue
        if ! nbdkit --filter="$so" null --version >/dev/null 2>&1; then
            rm -f "$so"
            stale=1
        fi
    done
    if [ -n "$built" ]; then
        for src in "$REPO"/zramd/*.c "$REPO"/zramd/csrc/*.[ch] \
                   "$REPO"/zramd/glue/*.[ch] "$REPO"/zramd/filter/*.[ch]; do
            [ -e "$src" ] && ! [ "$built" -nt "$src" ] && stale=1
        done
    fi
    if [ "$found" = "$REPO/zramd/__init__.py" ] && [ -x /usr/local/bin/zramd ] &&
            [ -n "$built" ] && [ -z "$stale" ]; then
        return 0
    fi
    say "zramd: installing $REPO for $PYTHON (editable)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --break-system-packages \
        --no-deps --no-build-isolation -e "$REPO" >/dev/null
}

# nbdkit 1.32 prints only the python plugin's own help for
# "nbdkit python plugin.py --help"; scripts/zramd_nbdkit_help.py adds the
# plugin's keys from inside nbdkit's embedded interpreter, imported at its
# start-up by a .pth file.  That interpreter reads the site directory of
# the prefix it takes from the first python3 on PATH, so the hook goes
# where it looks both with Debian's python3 first (as the quick start
# serves) and with the caller's PATH (a venv, a pyenv version).
HELP_HOOK=zramd_nbdkit_help
HELP_HOOK_PTH="import sys; getattr(sys, 'orig_argv', 1) or exec('try: import $HELP_HOOK\\nexcept ImportError: pass')"

# Prints the site directory whose .pth files nbdkit's embedded Python reads
# under the current PATH (the first of site.getsitepackages() on sys.path,
# else the first, to be created); prints nothing if it cannot start.
nbdkit_site_dir() {
    local probe out
    probe=$(mktemp --suffix=.py)
    cat >"$probe" <<'EOT'
import site, sys
API_VERSION = 2
def dump_plugin():
    dirs = site.getsitepackages()
    print("zramd_site_dir=" + ([d for d in dirs if d in sys.path] or dirs)[0])
def open(readonly): return 1
def get_size(h): return 0
def pread(h, buf, offset, flags): pass
EOT
    out=$(cd / && nbdkit python "$probe" --dump-plugin 2>/dev/null) || out=
    rm -f "$probe"
    sed -n 's/^zramd_site_dir=//p' <<<"$out"
}

# Installs (or refreshes) the hook where nbdkit's interpreter finds it.
install_help_hook() {
    local dir dirs=() path
    for path in "/usr/sbin:/usr/bin:$PATH" "$PATH"; do
        dir=$(PATH=$path nbdkit_site_dir)
        if [ -z "$dir" ]; then
            say "zramd: nbdkit's Python does not start with PATH=$path;" \
                "nbdkit python plugin.py --help will not list zramd's keys there"
            continue
        fi
        [[ " ${dirs[*]} " == *" $dir "* ]] || dirs+=("$dir")
    done
    for dir in "${dirs[@]}"; do
        if cmp -s "$REPO/scripts/$HELP_HOOK.py" "$dir/$HELP_HOOK.py" &&
                [ "$(cat "$dir/$HELP_HOOK.pth" 2>/dev/null)" = "$HELP_HOOK_PTH" ]; then
            continue
        fi
        # Not fatal: without it only --help is poorer.
        if mkdir -p "$dir" &&
                install -m 644 "$REPO/scripts/$HELP_HOOK.py" "$dir/$HELP_HOOK.py" &&
                printf '%s\n' "$HELP_HOOK_PTH" >"$dir/$HELP_HOOK.pth"; then
            say "zramd: nbdkit --help hook in $dir"
        else
            say "zramd: cannot install the nbdkit --help hook in $dir"
        fi
    done
}
