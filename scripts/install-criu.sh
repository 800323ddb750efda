#!/bin/sh
# Install CRIU 4 for the gateway's sandbox driver, without touching the host's apt setup.
#
# Debian 12 ships CRIU 3.17, whose `criu check` fails on kernels 6.13 and newer
# ("Unexpected rt vDSO area bounds", because those kernels add a [vvar_vclock]
# mapping). This script downloads CRIU 4 and the libraries it links against from
# Debian trixie with a private apt configuration: its own sources list, package
# lists and cache under $PREFIX/apt. It extracts them into $PREFIX/root and writes
# a wrapper that runs criu through that root's dynamic loader and libraries.
#
# Idempotent: when `criu check` already passes with a 4.x criu, it does nothing.
#
# Environment:
#   VMFLOW_CRIU_PREFIX   private root (default /opt/vmflow/criu)
#   VMFLOW_CRIU_WRAPPER  wrapper path (default /usr/local/bin/criu)
#   VMFLOW_CRIU_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   VMFLOW_CRIU_SUITE    Debian suite (default trixie)
set -eu

PREFIX=${VMFLOW_CRIU_PREFIX:-/opt/vmflow/criu}
WRAPPER=${VMFLOW_CRIU_WRAPPER:-/usr/local/bin/criu}
MIRROR=${VMFLOW_CRIU_MIRROR:-http://deb.debian.org/debian}
SUITE=${VMFLOW_CRIU_SUITE:-trixie}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { echo "install-criu: $*" >&2; }

# Return success when the given criu binary is 4.x or newer and `criu check` passes.
criu_works() {
    version=$("$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9]*\)\..*/\1/p')
    [ -n "$version" ] && [ "$version" -ge 4 ] && "$1" check >/dev/null 2>&1
}

for candidate in "$WRAPPER" "$(command -v criu 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && criu_works "$candidate"; then
        log "$candidate already works ($("$candidate" --version | head -n 1)); nothing to do"
        exit 0
    fi
done

if [ "$(id -u)" -ne 0 ]; then
    log "CRIU 4 is missing and this is not root; rerun as root to install it into $PREFIX"
    exit 1
fi
if [ ! -r /etc/debian_version ] || ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    log "CRIU 4 is missing and this is not Debian (apt-get, dpkg-deb); install CRIU 4 by hand"
    exit 1
fi
if [ ! -r "$KEYRING" ]; then
    log "$KEYRING is missing; install the debian-archive-keyring package"
    exit 1
fi

# Private apt configuration: nothing below is read from or written to /etc/apt or /var/lib/apt.
APT_DIR=$PREFIX/apt
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/parts" \
    "$APT_DIR/preferences.d" "$APT_DIR/debs"
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$APT_DIR/sources.list"
: > "$APT_DIR/status"
set -- \
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list" \
    -o "Dir::Etc::SourceParts=$APT_DIR/parts" \
    -o "Dir::Etc::Preferences=$APT_DIR/preferences" \
    -o "Dir::Etc::PreferencesParts=$APT_DIR/preferences.d" \
    -o "Dir::State::Lists=$APT_DIR/lists" \
    -o "Dir::State::Status=$APT_DIR/status" \
    -o "Dir::Cache=$APT_DIR/cache" \
    -o "APT::Architecture=amd64" \
    -o "APT::Architectures=amd64" \
    -o "APT::Sandbox::User=root"

log "updating the private package lists for $SUITE from $MIRROR"
apt-get "$@" -q update >/dev/null

# criu and the full closure of its Depends: with an empty status file apt lists every
# library, so the private root never mixes trixie's libc with the host's older libraries.
packages=$(apt-cache "$@" depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances criu | grep -v '^ ' | grep -v '^<' | sort -u)
log "downloading: $(echo "$packages" | tr '\n' ' ')"
cd "$APT_DIR/debs"
rm -f ./*.deb
# shellcheck disable=SC2086
apt-get "$@" -q download $packages >/dev/null

ROOT=$PREFIX/root
rm -rf "$ROOT.new"
mkdir -p "$ROOT.new"
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$ROOT.new"
done
rm -rf "$ROOT"
mv "$ROOT.new" "$ROOT"

LOADER=""
for path in "$ROOT/usr/lib64/ld-linux-x86-64.so.2" "$ROOT/lib64/ld-linux-x86-64.so.2" \
    "$ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"; do
    if [ -e "$path" ]; then
        LOADER=$path
        break
    fi
done
if [ -z "$LOADER" ] || [ ! -x "$ROOT/usr/sbin/criu" ]; then
    log "the extracted root $ROOT has no dynamic loader or no usr/sbin/criu"
    exit 1
fi

mkdir -p "$(dirname "$WRAPPER")"
cat > "$WRAPPER.new" <<EOF
#!/bin/sh
# Written by vmflow's scripts/install-criu.sh: CRIU $SUITE from $PREFIX, run via its own loader.
exec "$LOADER" --library-path "$ROOT/usr/lib/x86_64-linux-gnu:$ROOT/lib/x86_64-linux-gnu" \\
    "$ROOT/usr/sbin/criu" "\$@"
EOF
chmod 755 "$WRAPPER.new"
mv "$WRAPPER.new" "$WRAPPER"

if ! criu_works "$WRAPPER"; then
    log "installed $WRAPPER, but 'criu check' fails:"
    "$WRAPPER" check >&2 || true
    exit 1
fi
log "installed $("$WRAPPER" --version | head -n 1) at $WRAPPER (root $ROOT)"
