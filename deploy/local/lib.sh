# Shared by the deploy/local scripts: install what a fresh Debian machine lacks.

# need_packages CMD:PACKAGE ... installs each Debian PACKAGE whose CMD is not on the PATH.
need_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]} (Debian packages)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

need_cargo() {
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo is missing: install a Rust toolchain (https://rustup.rs) first" >&2
    exit 1
  }
}
