# Shared by scripts/quickstart and scripts/test (sourced, not run).
#
# Everything comes from Debian 12's apt for /usr/bin/python3, the
# interpreter nbdkit's python plugin embeds (libpython3.11); our package is
# installed for that interpreter in editable mode, so /usr/local/bin/zramd
# and nbdkit both see this clone.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=/usr/bin/python3

# What serving and attaching a device needs.
RUNTIME_PACKAGES=(
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd
    python3-lz4 python3-zstandard python3-pip python3-setuptools
    qemu-utils fio fuse3 e2fsprogs util-linux mount kmod
)
# What the test suite needs on top.
TEST_PACKAGES=(python3-pytest python3-hypothesis python3-pytest-timeout systemd)

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

# Installs this clone for /usr/bin/python3 (editable), unless it already is.
install_zramd() {
    local found
    found=$(cd / && "$PYTHON" -c 'import zramd; print(zramd.__file__)' 2>/dev/null) || found=
    if [ "$found" = "$REPO/zramd/__init__.py" ] && [ -x /usr/local/bin/zramd ]; then
        return 0
    fi
    say "zramd: installing $REPO for $PYTHON (editable)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore --break-system-packages \
        --no-deps --no-build-isolation -e "$REPO" >/dev/null
}
