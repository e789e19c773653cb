#!/usr/bin/env bash
# System packages (Debian 12 / Ubuntu 24.04). Argument: what for.
#   demo  what `tunnel-agent demo` needs: Python, GStreamer's RTSP server (the synthetic camera)
#         and mosquitto (the IoT Hub emulator)
#   test  the demo's packages and the tests' real components (the default)
# Idempotent: installs only what is missing. Needs root or sudo.
set -euo pipefail

DEMO_PACKAGES=(
  python3 python3-venv python3-gi gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-plugins-bad
  mosquitto
)
# Proxies (HTTP, SOCKS5, and Dante for SOCKS4), ffprobe/ffmpeg, socat, systemd-analyze, network
# namespaces (iproute2), browsers (Chromium and its driver; Firefox ESR, driven over its own
# WebDriver BiDi), and RTSP clients that are not FFmpeg (VLC, GStreamer's gst-launch-1.0 rtspsrc).
TEST_PACKAGES=(
  tinyproxy microsocks dante-server ffmpeg socat systemd iproute2
  chromium chromium-driver vlc-bin vlc-plugin-base gstreamer1.0-tools gstreamer1.0-libav
)
# Ubuntu's archive has no firefox-esr (its firefox is a snap): there the Firefox tests skip.
# Firefox decodes H.264 with the system's libavcodec, only a Recommends of firefox-esr: the ffmpeg
# package above brings it.
# shellcheck source=/dev/null
OS_ID=$(. /etc/os-release && echo "${ID:-}")
[ "$OS_ID" = ubuntu ] || TEST_PACKAGES+=(firefox-esr)

case "${1:-test}" in
  demo) PACKAGES=("${DEMO_PACKAGES[@]}") ;;
  test) PACKAGES=("${DEMO_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac

# Before fetching anything: an interpreter that is already there and too old (Ubuntu 22.04's 3.10).
bash "$(dirname "$0")/check-python.sh" --if-present

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi

SUDO=()
[ "$(id -u)" -eq 0 ] || SUDO=(sudo)
# env after sudo: sudo would drop DEBIAN_FRONTEND from the environment.
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
# Do not let the packages' own services start on their default ports: the project runs its own.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
  trap '"${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi

echo "system packages: updating the package lists"
"${APT[@]}" update -qq
# Say how much is coming before fetching it, so a slow mirror does not look like a hang.
count=$("${APT[@]}" install -s --no-install-recommends "${missing[@]}" | grep -c '^Inst ' || true)
download=$("${APT[@]}" install -qq --print-uris --no-install-recommends "${missing[@]}" \
  | awk '{ total += $3 } END { printf "%.1f MB", total / 1e6 }')
echo "system packages: installing ${missing[*]}"
echo "system packages: $count to install with their dependencies, $download to download"

# apt's machine-readable progress (APT::Status-Fd: "dlstatus:1:24.5079:Retrieving file 1 of 9",
# "pmstatus:mosquitto:60.0000:Configuring mosquitto (amd64)"), one line per 10 %.
progress() {
  local line field percent step phase last_download=-10 last_install=-10
  while IFS= read -r line; do
    percent=""
    IFS=: read -ra fields <<<"$line"
    for field in "${fields[@]:1}"; do
      if [[ $field =~ ^[0-9]+\.[0-9]{4}$ ]]; then percent=${field%%.*}; break; fi
    done
    [ -n "$percent" ] || continue
    step=$((percent / 10 * 10))
    case "${fields[0]}" in
      dlstatus) phase=downloaded; [ "$step" -gt "$last_download" ] || continue; last_download=$step ;;
      pmstatus) phase=installed; [ "$step" -gt "$last_install" ] || continue; last_install=$step ;;
      *) continue ;;
    esac
    echo "system packages: $phase $step %"
  done
}
# fd 3 carries the status lines to progress(); apt's own output goes to a log shown on failure.
log=$(mktemp)
if ! "${APT[@]}" install -y -q --no-install-recommends -o APT::Status-Fd=3 "${missing[@]}" \
    3>&1 >"$log" 2>&1 | progress; then
  cat "$log" >&2
  rm -f "$log"
  echo "system packages: apt-get install failed" >&2
  exit 1
fi
rm -f "$log"
echo "system packages: installed"
