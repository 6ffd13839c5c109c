#!/usr/bin/env bash
# Install the Debian packages Quern's tests need (guest boots, fio, Ceph,
# Prometheus), with one consistent set of QEMU packages.
#
# Works from any state of a Debian 12 machine of the project's kind:
#   - fresh: qemu-utils 10 from bookworm-backports preinstalled, no backports
#     source: the source is added and the QEMU packages come from there;
#   - QEMU 7.2 from bookworm already installed: the rest comes at 7.2;
#   - everything already installed and consistent: nothing is done and the
#     network is not touched.
# The QEMU version is never assumed: it is the installed qemu-utils' version
# (the package fresh machines come with), else the installed
# qemu-system-x86's, else the newest bookworm offers. Every QEMU package is
# installed at exactly that version, so apt cannot mix 7.2 and 10.
#
# Needs root (or sudo). Prints what it decided and what it did; a failure
# names the package and the reason and exits non-zero.
#
# Usage: scripts/install-test-deps.sh
set -euo pipefail

log() { echo "install-test-deps: $*" >&2; }
die() { echo "install-test-deps: error: $*" >&2; exit 1; }

# QEMU packages, all installed at one version:
#   qemu-utils         qemu-img, qemu-nbd (and, from 8.0 on, qemu-storage-daemon)
#   qemu-system-x86    qemu-system-x86_64 for the guest tests
#   qemu-system-common qemu-storage-daemon in 7.2; shared files
#   qemu-block-extra   QEMU's rbd: block driver (qemu-img against RBD images)
QEMU_PACKAGES=(qemu-utils qemu-system-x86 qemu-system-common qemu-block-extra)

# Everything else, at whatever version the machine's sources give:
#   fio, busybox-static, cpio, gzip, xz-utils, libc-bin (ldd): guest initramfs
#   e2fsprogs      mkfs.ext4 / debugfs for ext4 root images
#   python3, coreutils (timeout): test drivers
#   ceph-mon, ceph-osd, ceph-common: a one-node Ceph cluster for the rbd tests;
#   librbd-dev, librados-dev: librbd1/librados2 (Quern loads them at run time)
#   prometheus     the metrics tests scrape Quern with a real Prometheus
# The guest kernel is fetched by tests/guest/build-guest.sh with
# `apt-get download` (it is not installed on the host).
OTHER_PACKAGES=(
  fio busybox-static cpio gzip xz-utils libc-bin e2fsprogs python3 coreutils
  ceph-mon ceph-osd ceph-common librbd-dev librados-dev
  prometheus
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

# The installed version of package $1, or nothing.
installed_version() {
  local status
  status="$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null || true)"
  case "$status" in
    "installed "*) echo "${status#installed }" ;;
  esac
}

# Does some configured source (or the dpkg status) offer package $1 at
# version $2?
version_available() {
  apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    grep -qxF "$2"
}

# --- The QEMU version the machine is committed to --------------------------
target_qemu_version() {
  local v
  v="$(installed_version qemu-utils)"
  if [ -n "$v" ]; then echo "$v qemu-utils"; return; fi
  v="$(installed_version qemu-system-x86)"
  if [ -n "$v" ]; then echo "$v qemu-system-x86"; return; fi
  v="$(apt-cache policy qemu-utils 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -n "$v" ] && [ "$v" != "(none)" ]; then echo "$v candidate"; return; fi
  echo ""
}

# --- Already done? ----------------------------------------------------------
# Everything installed, and every QEMU package at the same version.
all_installed_and_consistent() {
  local pkg v first=""
  for pkg in "${OTHER_PACKAGES[@]}"; do
    [ -n "$(installed_version "$pkg")" ] || return 1
  done
  for pkg in "${QEMU_PACKAGES[@]}"; do
    v="$(installed_version "$pkg")"
    [ -n "$v" ] || return 1
    [ -z "$first" ] && first="$v"
    [ "$v" = "$first" ] || return 1
  done
  log "all $((${#OTHER_PACKAGES[@]} + ${#QEMU_PACKAGES[@]})) packages installed; QEMU packages at $first"
}

if all_installed_and_consistent; then
  exit 0
fi

# --- Sources ------------------------------------------------------------------
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[ -n "$CODENAME" ] || die "cannot tell the Debian release (/etc/os-release has no VERSION_CODENAME)"
BACKPORTS="$CODENAME-backports"
BACKPORTS_FILE=/etc/apt/sources.list.d/quern-$BACKPORTS.sources

# Does apt itself use a $BACKPORTS source? Asking apt (after an update)
# means commented-out lines, "Enabled: no" stanzas and files apt ignores
# (*.save, *.disabled) do not count.
backports_configured() {
  apt-cache policy 2>/dev/null | grep -qE "[ ,]n=$BACKPORTS(,|\$)"
}

# Add $CODENAME-backports with the mirror and key of the main Debian source.
add_backports_source() {
  local uri key
  uri="$(awk -v s="$CODENAME" '
      /^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == s) found=u}
      END {print found}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  key="$(awk -v u="$uri" '/^URIs:/ {cur=$2} /^Signed-By:/ && cur == u {print $2; exit}' \
      /etc/apt/sources.list.d/*.sources 2>/dev/null || true)"
  if [ -z "$uri" ]; then
    uri="$(awk -v s="$CODENAME" '$1 == "deb" && $3 == s {print $2; exit}' \
        /etc/apt/sources.list 2>/dev/null || true)"
  fi
  [ -n "$uri" ] || uri=http://deb.debian.org/debian
  [ -n "$key" ] || key=/usr/share/keyrings/debian-archive-keyring.gpg
  log "adding the $BACKPORTS source ($uri, key $key) as $BACKPORTS_FILE"
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
    "$uri" "$BACKPORTS" "$key" | $SUDO tee "$BACKPORTS_FILE" >/dev/null
}

apt_update() {
  log "apt-get update"
  $SUDO apt-get update -q >/dev/null || die "apt-get update failed (network or sources; see above)"
}

# The QEMU release a version belongs to: the version without its Debian
# revision ("1:7.2+dfsg-7+deb12u18+b3" -> "1:7.2+dfsg"). Rebuilds (+bN) and
# stable updates (deb12uN) of one release are interchangeable for the tests;
# the archive keeps only the newest, so an installed one may be gone from it.
qemu_release() { echo "${1%-*}"; }

# Is every QEMU package installed at $1 or offered at $1?
whole_set_at() {
  local pkg
  for pkg in "${QEMU_PACKAGES[@]}"; do
    [ "$(installed_version "$pkg")" = "$1" ] && continue
    version_available "$pkg" "$1" || return 1
  done
}

# The version to install every QEMU package at: $1 itself when the whole set
# is there, else the newest version of the same release that is.
pick_qemu_version() {
  local want="$1" v
  if whole_set_at "$want"; then echo "$want"; return; fi
  apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
    sort -u | sort -r -V | while read -r v; do
      [ "$(qemu_release "$v")" = "$(qemu_release "$want")" ] || continue
      if whole_set_at "$v"; then echo "$v"; break; fi
    done
}

read -r BASE_VERSION QEMU_FROM <<<"$(target_qemu_version)" || true
apt_update
if [ -z "${BASE_VERSION:-}" ]; then
  read -r BASE_VERSION QEMU_FROM <<<"$(target_qemu_version)" || true
  [ -n "${BASE_VERSION:-}" ] || die "package qemu-utils: no version installed and none offered by the apt sources"
fi
log "QEMU release to match: $(qemu_release "$BASE_VERSION") (the $QEMU_FROM package is at $BASE_VERSION)"

QEMU_VERSION="$(pick_qemu_version "$BASE_VERSION")"
# A backports QEMU (e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1, what fresh machines
# come with) needs the backports source, which they do not have.
if [ -z "$QEMU_VERSION" ] && [[ "$BASE_VERSION" == *bpo* ]] && ! backports_configured; then
  log "no configured source offers QEMU $(qemu_release "$BASE_VERSION"); it comes from $BACKPORTS"
  add_backports_source
  apt_update
  QEMU_VERSION="$(pick_qemu_version "$BASE_VERSION")"
fi
if [ -z "$QEMU_VERSION" ]; then
  for pkg in "${QEMU_PACKAGES[@]}"; do
    if [ -z "$(apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' |
               while read -r v; do [ "$(qemu_release "$v")" = "$(qemu_release "$BASE_VERSION")" ] && echo "$v"; done)" ]; then
      die "package $pkg: no configured apt source offers QEMU release $(qemu_release "$BASE_VERSION"), which the installed $QEMU_FROM ($BASE_VERSION) needs; add the source that has it, or remove $QEMU_FROM"
    fi
  done
  die "packages ${QEMU_PACKAGES[*]}: no one version of QEMU release $(qemu_release "$BASE_VERSION") is offered for all of them ($QEMU_FROM is at $BASE_VERSION)"
fi
[ "$QEMU_VERSION" = "$BASE_VERSION" ] ||
  log "$BASE_VERSION is no longer in the archive for every QEMU package; using $QEMU_VERSION of the same release"
log "QEMU packages will be at $QEMU_VERSION"

# --- Install --------------------------------------------------------------------
# The other packages first, at the release's own versions, so that the QEMU
# step below never chooses their libraries (librbd1 for qemu-block-extra, say).
apt_install() {
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
log "installing ${OTHER_PACKAGES[*]}"
apt_install "${OTHER_PACKAGES[@]}" ||
  die "apt-get install of the test packages failed (the first 'E:' line above names the package and the reason)"

# The QEMU packages, each pinned to the one version. A backports QEMU needs
# its newer dependencies (seabios, qemu-system-data) from backports too, so
# apt is told to prefer that release for this install; packages already
# installed that satisfy a dependency are left alone.
pinned=()
for pkg in "${QEMU_PACKAGES[@]}"; do
  pinned+=("$pkg=$QEMU_VERSION")
done
target=()
if [[ "$QEMU_VERSION" == *bpo* ]]; then
  target=(-t "$BACKPORTS")
fi
log "installing ${pinned[*]} ${target[*]}"
apt_install "${target[@]}" "${pinned[@]}" ||
  die "apt-get install of QEMU $QEMU_VERSION failed (the first 'E:' line above names the package and the reason)"

all_installed_and_consistent ||
  die "after apt-get install the QEMU packages still disagree: $(for p in "${QEMU_PACKAGES[@]}"; do printf '%s=%s ' "$p" "$(installed_version "$p")"; done)"
log "done"
