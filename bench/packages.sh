# bench/packages.sh — sourced by bench/run.sh and bench/profile.sh.
#
# need_tools TOOL:PACKAGE...  installs, from Debian, the package of every
# TOOL not found on PATH (needs a `log` function).
need_tools() {
  local need=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
  done
  ((${#need[@]})) || return 0
  log "installing ${need[*]}"
  local sudo=
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  # The packages' own service must not start and grab port 80.
  echo exit 101 | $sudo tee /usr/sbin/policy-rc.d >/dev/null; $sudo chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  $sudo rm -f /usr/sbin/policy-rc.d
}
