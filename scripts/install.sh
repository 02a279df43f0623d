#!/usr/bin/env bash
# Installs fhir-gateway on a VM as a systemd service. Idempotent: run it again after a new build
# to upgrade the binary (the running service is reloaded without downtime); what is already in
# place is left alone. Operations guide: docs/operations.md.
#
#   sudo scripts/install.sh [--binary PATH] [--instance NAME[:PORT:METRICS_PORT]]... [--no-start]
#   scripts/install.sh --root DIR ...      install into DIR (also DESTDIR=DIR): files, user in
#                                          DIR/etc/passwd, unit enabled offline, nothing started
#   scripts/install.sh --dry-run ...       print what would change, change nothing
#   The binary defaults to $FHIR_GATEWAY_BINARY, else target/release/fhir-gateway of this checkout.
#
# What it does, each step only when needed:
#   1. binary          /usr/local/bin/fhir-gateway (replaced atomically when it differs; the
#                      one it replaces is kept as /usr/local/bin/fhir-gateway.prev)
#   2. system user     fhir-gateway, no login shell, no home (systemd-sysusers, else useradd);
#                      /usr/local/lib/sysusers.d/fhir-gateway.conf
#   3. units           /usr/local/lib/systemd/system/fhir-gateway.service, fhir-gateway@.service
#                      (replaced when they differ: local changes belong in drop-ins)
#   4. configuration   /etc/fhir-gateway/ (root:fhir-gateway 0750);
#                      fhir-gateway.yaml from conf/fhir-gateway.systemd.yaml and fhir-gateway.env
#                      (0640, variables to fill in), each only if absent: never overwritten.
#                      With --instance NAME:PORT:METRICS_PORT: NAME.yaml (if absent) with its own
#                      ports, /run/fhir-gateway/NAME and /var/lib/fhir-gateway/NAME.
#                      /var/lib/fhir-gateway (the unit's StateDirectory), fhir-gateway 0750
#   5. docs, examples  /usr/local/share/doc/fhir-gateway/
#   6. check           fhir-gateway -t with the env file(s), as the fhir-gateway user;
#                      on failure: nothing is enabled or started, exit 3
#   7. enable + start  fhir-gateway.service (or fhir-gateway@NAME for each --instance); a running
#                      service whose binary changed is reloaded (SIGQUIT + -u, no dropped
#                      connection); a changed unit file is only reported (a restart drains)
#
# Exit codes: 0 done, 1 error, 2 usage, 3 configuration check failed (fix it, run again).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME=fhir-gateway
SVC_USER=fhir-gateway

BINARY="${FHIR_GATEWAY_BINARY:-$REPO/target/release/fhir-gateway}"
ROOT="${DESTDIR:-}"
DRY=0
START=1
INSTANCES=()

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) BINARY="${2:?--binary needs a path}"; shift 2 ;;
    --binary=*) BINARY="${1#*=}"; shift ;;
    --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
    --root=*) ROOT="${1#*=}"; shift ;;
    --instance) INSTANCES+=("${2:?--instance needs NAME[:PORT:METRICS_PORT]}"); shift 2 ;;
    --instance=*) INSTANCES+=("${1#*=}"); shift ;;
    --dry-run|-n) DRY=1; shift ;;
    --no-start) START=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# R is the prefix of every target path: empty for the real system.
R=""
if [ -n "$ROOT" ]; then
  R="$(realpath -m -- "$ROOT")"
  [ "$R" != / ] || R=""
fi

BIN_DIR=/usr/local/bin
UNIT_DIR=/usr/local/lib/systemd/system
SYSUSERS_DIR=/usr/local/lib/sysusers.d
DOC_DIR=/usr/local/share/doc/fhir-gateway
CONF_DIR=/etc/fhir-gateway
ENV_FILE=$CONF_DIR/fhir-gateway.env

log() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: %s\n' "$*" >&2; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# Every change goes through act (printed, run unless --dry-run) or quietly through run_q
# (for the steps of one change that put_file has already announced).
CHANGES=0
act() {
  CHANGES=$((CHANGES + 1))
  if [ "$DRY" = 1 ]; then
    log "would: $*"
  else
    log "+ $*"
    "$@"
  fi
}
run_q() {
  [ "$DRY" = 1 ] || "$@"
}
announce() {
  CHANGES=$((CHANGES + 1))
  if [ "$DRY" = 1 ]; then log "would: $*"; else log "+ $*"; fi
}

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
if [ -z "$R" ] && [ "$IS_ROOT" = 0 ] && [ "$DRY" = 0 ]; then
  die "installing into / needs root (sudo), or use --root DIR / --dry-run"
fi

if [ ! -f "$BINARY" ] || [ ! -x "$BINARY" ]; then
  die "no executable binary at $BINARY (cargo build --release, or --binary PATH)"
fi
"$BINARY" --version >/dev/null 2>&1 || die "$BINARY --version failed: not a fhir-gateway binary for this machine?"
for f in conf/fhir-gateway.systemd.yaml systemd/fhir-gateway.service systemd/fhir-gateway@.service; do
  [ -f "$REPO/$f" ] || die "missing $REPO/$f (run the script from a checkout)"
done

# ---- instances -------------------------------------------------------------------------------
declare -A INST_PORT=() INST_MPORT=() USED_PORTS=()
INST_NAMES=()
for spec in ${INSTANCES[@]+"${INSTANCES[@]}"}; do
  IFS=: read -r iname iport impt extra <<<"$spec"
  [ -z "${extra:-}" ] || die "--instance $spec: NAME[:PORT:METRICS_PORT]"
  [[ "$iname" =~ ^[A-Za-z0-9_-]+$ ]] || die "--instance $spec: the name may hold only A-Z a-z 0-9 _ -"
  [ "$iname" != "$NAME" ] || die "--instance $NAME would share fhir-gateway.yaml/.env with the plain unit: pick another name"
  for p in "${iport:-}" "${impt:-}"; do
    [ -z "$p" ] || { [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ]; } || die "--instance $spec: bad port $p"
  done
  { [ -z "${iport:-}" ] && [ -z "${impt:-}" ]; } || { [ -n "${iport:-}" ] && [ -n "${impt:-}" ]; } \
    || die "--instance $spec: give both PORT and METRICS_PORT, or neither"
  [ -z "${INST_PORT[$iname]+x}" ] || die "--instance $iname given twice"
  for p in "${iport:-}" "${impt:-}"; do
    [ -z "$p" ] || [ -z "${USED_PORTS[$p]+x}" ] || die "--instance $spec: port $p is used twice"
    [ -z "$p" ] || USED_PORTS[$p]=1
  done
  INST_NAMES+=("$iname")
  INST_PORT[$iname]="${iport:-}"
  INST_MPORT[$iname]="${impt:-}"
done

# ---- helpers ---------------------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fhir-gateway-install.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# The numeric gid of the service group in the target root ("" if it does not exist yet).
group_gid() {
  if [ -n "$R" ]; then
    if [ -f "$R/etc/group" ]; then
      awk -F: -v g="$SVC_USER" '$1 == g { print $3; exit }' "$R/etc/group"
    fi
  else
    getent group "$SVC_USER" | cut -d: -f3 || true
  fi
}
user_exists() {
  if [ -n "$R" ]; then
    [ -f "$R/etc/passwd" ] && awk -F: -v u="$SVC_USER" '$1 == u { f = 1 } END { exit !f }' "$R/etc/passwd"
  else
    getent passwd "$SVC_USER" >/dev/null
  fi
}

# The numeric uid of the service user in the target root ("" if it does not exist yet).
user_uid() {
  if [ -n "$R" ]; then
    if [ -f "$R/etc/passwd" ]; then
      awk -F: -v u="$SVC_USER" '$1 == u { print $3; exit }' "$R/etc/passwd"
    fi
  else
    getent passwd "$SVC_USER" | cut -d: -f3 || true
  fi
}

# owner "root" (root:root), "svc" (root:fhir-gateway) or "user" (fhir-gateway:fhir-gateway)
# -> uid:gid to apply, or "" when ownership cannot be set here.
owner_spec() {
  [ "$IS_ROOT" = 1 ] || { printf ''; return; }
  local gid uid
  gid="$(group_gid)"
  case "$1" in
    root) printf '0:0' ;;
    svc) [ -z "$gid" ] || printf '0:%s' "$gid" ;;
    user) uid="$(user_uid)"; [ -z "$uid" ] || [ -z "$gid" ] || printf '%s:%s' "$uid" "$gid" ;;
  esac
}

# Fix mode and owner of an existing path if they differ.
ensure_meta() { # path mode owner
  local path="$1" mode="$2" own cur
  own="$(owner_spec "$3")"
  cur="$(stat -c '%a' "$path")"
  [ "$cur" = "${mode#0}" ] || act chmod "$mode" "$path"
  if [ -n "$own" ]; then
    cur="$(stat -c '%u:%g' "$path")"
    [ "$cur" = "$own" ] || act chown "$own" "$path"
  fi
}

# Directories a dry run would have created (so that it does not announce them twice).
declare -A DRY_DIRS=()
is_dir() { [ -d "$1" ] || [ -n "${DRY_DIRS[$1]+x}" ]; }

# Our own directory: created, and its mode and owner kept as given.
ensure_dir() { # dir mode owner
  local own
  own="$(owner_spec "$3")"
  if [ -d "$1" ]; then
    ensure_meta "$@"
  elif ! is_dir "$1"; then
    act install -d -m "$2" "$1"
    if [ -n "$own" ]; then run_q chown "$own" "$1"; fi
    DRY_DIRS[$1]=1
  fi
}

# A system directory (/usr/local/bin ...): created if missing, never modified.
make_parent() {
  if ! is_dir "$1"; then
    act install -d -m 0755 "$1"
    DRY_DIRS[$1]=1
  fi
}

# Copy src to dest (atomically: temporary file + rename) if the content differs; else only fix
# mode/owner. Sets CHANGED=1 when the content was (or would be) replaced.
CHANGED=0
put_file() { # src dest mode owner
  local src="$1" dest="$2" mode="$3" own what=new
  CHANGED=0
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    ensure_meta "$dest" "$mode" "$4"
    log "unchanged: $dest"
    return
  fi
  CHANGED=1
  [ ! -e "$dest" ] || what=updated
  make_parent "$(dirname "$dest")"
  own="$(owner_spec "$4")"
  announce "install $dest ($what, mode $mode, owner root:$([ "$4" = svc ] && echo "$SVC_USER" || echo root))"
  # Atomic: a running gateway keeps its binary, a reader never sees half a file.
  run_q install -m "$mode" "$src" "$dest.new.$$"
  if [ -n "$own" ]; then run_q chown "$own" "$dest.new.$$"; fi
  run_q mv -f "$dest.new.$$" "$dest"
}

# Create dest from src only if dest does not exist (configuration: never overwritten).
new_file() { # src dest mode owner
  if [ -e "$2" ]; then
    log "kept (exists, never overwritten): $2"
    return
  fi
  put_file "$@"
}

# Environment of a unit as systemd builds it from EnvironmentFile=: KEY=VALUE lines, # and ;
# comments, optional surrounding quotes. Printed as KEY=VALUE lines for `env -i`.
read_env_file() {
  local line key val
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    case "$line" in ''|'#'*|';'*) continue ;; esac
    key="${line%%=*}"
    [ "$key" != "$line" ] || continue
    key="${key%"${key##*[![:space:]]}"}"
    val="${line#*=}"
    val="${val#"${val%%[![:space:]]*}"}"
    case "$val" in
      \"*\") val="${val:1:${#val}-2}" ;;
      \'*\') val="${val:1:${#val}-2}" ;;
    esac
    printf '%s=%s\n' "$key" "$val"
  done <"$1"
}

# ---- 1. binary -------------------------------------------------------------------------------
log "== binary"
# The binary being replaced stays as fhir-gateway.prev, for a rollback (docs/operations.md).
if [ -f "$R$BIN_DIR/fhir-gateway" ] && ! cmp -s "$BINARY" "$R$BIN_DIR/fhir-gateway"; then
  act cp -p "$R$BIN_DIR/fhir-gateway" "$R$BIN_DIR/fhir-gateway.prev"
fi
put_file "$BINARY" "$R$BIN_DIR/fhir-gateway" 0755 root
BIN_CHANGED=$CHANGED

# ---- 2. system user --------------------------------------------------------------------------
log "== system user $SVC_USER"
cat >"$TMP/sysusers.conf" <<EOF
# fhir-gateway service account (scripts/install.sh): no login shell, no home directory of its
# own; its state lives in /var/lib/fhir-gateway (systemd StateDirectory=).
u $SVC_USER - "FHIR gateway" /var/lib/fhir-gateway /usr/sbin/nologin
EOF
put_file "$TMP/sysusers.conf" "$R$SYSUSERS_DIR/fhir-gateway.conf" 0644 root
if user_exists; then
  log "unchanged: user $SVC_USER exists"
elif command -v systemd-sysusers >/dev/null; then
  if [ -n "$R" ]; then
    make_parent "$R/etc"
    act systemd-sysusers --root="$R" "$R$SYSUSERS_DIR/fhir-gateway.conf"
  else
    act systemd-sysusers "$SYSUSERS_DIR/fhir-gateway.conf"
  fi
elif [ -z "$R" ] && command -v useradd >/dev/null; then
  act useradd --system --user-group --no-create-home --home-dir /var/lib/fhir-gateway \
    --shell /usr/sbin/nologin --comment "FHIR gateway" "$SVC_USER"
else
  die "cannot create the user $SVC_USER: neither systemd-sysusers nor (for /) useradd found"
fi

# ---- 3. units --------------------------------------------------------------------------------
log "== systemd units"
UNITS_CHANGED=0
for u in fhir-gateway.service fhir-gateway@.service; do
  put_file "$REPO/systemd/$u" "$R$UNIT_DIR/$u" 0644 root
  [ "$CHANGED" = 0 ] || UNITS_CHANGED=1
done
for old in /etc/systemd/system/fhir-gateway.service /etc/systemd/system/fhir-gateway@.service; do
  [ ! -f "$R$old" ] || warn "$old exists and overrides $UNIT_DIR/$(basename "$old"): remove it unless that is intended"
done

# ---- 4. configuration ------------------------------------------------------------------------
log "== configuration $CONF_DIR"
ensure_dir "$R$CONF_DIR" 0750 svc
cat >"$TMP/env" <<'EOF'
# fhir-gateway environment: read by systemd (EnvironmentFile=) for fhir-gateway.service and every
# fhir-gateway@.service instance; ${NAME} references in the YAML files are filled from it.
# One NAME=value per line, no shell syntax (no export, no $expansion). Secrets live here:
# keep the file root:fhir-gateway 0640. scripts/install.sh never overwrites it.
# After a change: systemctl reload fhir-gateway (or restart), see docs/operations.md.
#
# The placeholders below do not work: FHIR_UPSTREAM_URL does not resolve, so `fhir-gateway -t`
# (and the service start) fails until they are replaced.

# Public base URL the clients use (what the load balancer publishes).
FHIR_GATEWAY_PUBLIC_BASE_URL=https://fhir.example.org/fhir
# Entra ID tenant of the callers' tokens, and the gateway's API app registration.
FHIR_GATEWAY_TENANT_ID=00000000-0000-0000-0000-000000000000
FHIR_GATEWAY_API_APP_ID=11111111-1111-1111-1111-111111111111
FHIR_GATEWAY_API_APP_ID_URI=api://11111111-1111-1111-1111-111111111111

# The FHIR server, and the gateway's own identity towards it (client credentials).
FHIR_UPSTREAM_URL=https://fhir-server.example.invalid/fhir
FHIR_UPSTREAM_CLIENT_ID=22222222-2222-2222-2222-222222222222
FHIR_UPSTREAM_CLIENT_SECRET=change-me
FHIR_UPSTREAM_SCOPE=https://fhir-server.example.invalid/.default
EOF
new_file "$TMP/env" "$R$ENV_FILE" 0640 svc
if [ -f "$R$ENV_FILE" ]; then
  m="$(stat -c '%a' "$R$ENV_FILE")"
  case "$m" in ?[0-7]0) ;; *) warn "$ENV_FILE has mode $m: it holds secrets, make it 0640 (chmod 0640 $ENV_FILE)" ;; esac
fi

CONFIGS=()   # "unit|config|envfile..." to check and enable
if [ ${#INST_NAMES[@]} -eq 0 ]; then
  new_file "$REPO/conf/fhir-gateway.systemd.yaml" "$R$CONF_DIR/fhir-gateway.yaml" 0640 svc
  CONFIGS+=("fhir-gateway.service|$CONF_DIR/fhir-gateway.yaml|$ENV_FILE")
else
  for i in "${INST_NAMES[@]}"; do
    conf="$CONF_DIR/$i.yaml"
    if [ ! -e "$R$conf" ]; then
      [ -n "${INST_PORT[$i]}" ] || die "--instance $i: $conf does not exist yet: give its ports, --instance $i:PORT:METRICS_PORT"
      for p in "${INST_PORT[$i]}" "${INST_MPORT[$i]}"; do
        for other in "$R$CONF_DIR"/*.yaml; do
          [ -f "$other" ] || continue
          if grep -qE "^ *(- )?(addr|listen): *\"?[^ ]*:$p\"? *(#.*)?$" "$other"; then
            die "--instance $i: port $p is already used in $other"
          fi
        done
      done
      {
        printf '# fhir-gateway instance %s (fhir-gateway@%s.service), written by\n' "$i" "$i"
        printf '# scripts/install.sh --instance %s:%s:%s from the example below.\n' \
          "$i" "${INST_PORT[$i]}" "${INST_MPORT[$i]}"
        sed -e "1d" \
            -e "s#0\\.0\\.0\\.0:8080#0.0.0.0:${INST_PORT[$i]}#" \
            -e "s#127\\.0\\.0\\.1:9091#127.0.0.1:${INST_MPORT[$i]}#" \
            -e "s#/run/fhir-gateway\\b#/run/fhir-gateway/$i#g" \
            -e "s#/var/lib/fhir-gateway\\b#/var/lib/fhir-gateway/$i#g" \
            "$REPO/conf/fhir-gateway.systemd.yaml"
      } >"$TMP/$i.yaml"
    fi
    new_file "$TMP/$i.yaml" "$R$conf" 0640 svc
    CONFIGS+=("fhir-gateway@$i.service|$conf|$ENV_FILE|$CONF_DIR/$i.env")
  done
fi

# The unit's StateDirectory= (systemd creates it too): present before the first start, so
# that `-t` run as the service user can create the events spool directory in it.
log "== state directory /var/lib/fhir-gateway"
ensure_dir "$R/var/lib/fhir-gateway" 0750 user
for i in ${INST_NAMES[@]+"${INST_NAMES[@]}"}; do
  ensure_dir "$R/var/lib/fhir-gateway/$i" 0750 user
done

# ---- 5. docs and examples --------------------------------------------------------------------
log "== documentation $DOC_DIR"
put_file "$REPO/conf/fhir-gateway.systemd.yaml" "$R$DOC_DIR/fhir-gateway.systemd.yaml" 0644 root
put_file "$REPO/conf/fhir-gateway.yaml" "$R$DOC_DIR/fhir-gateway.reference.yaml" 0644 root
if [ -f "$REPO/docs/operations.md" ]; then
  put_file "$REPO/docs/operations.md" "$R$DOC_DIR/operations.md" 0644 root
fi

# ---- 6. configuration check ------------------------------------------------------------------
log "== configuration check (fhir-gateway -t)"
CHECK_BIN="$R$BIN_DIR/fhir-gateway"
[ "$DRY" = 0 ] || CHECK_BIN="$BINARY"
FAILED=0
for c in "${CONFIGS[@]}"; do
  IFS='|' read -r unit conf envs <<<"$c"
  if [ ! -f "$R$conf" ]; then
    log "not checked (would be created): $conf"
    continue
  fi
  vars=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
  IFS='|' read -r -a envfiles <<<"$envs"
  for e in "${envfiles[@]}"; do
    [ -f "$R$e" ] || continue
    while IFS= read -r kv; do vars+=("$kv"); done < <(read_env_file "$R$e")
  done
  runas=()
  if [ -z "$R" ] && [ "$IS_ROOT" = 1 ] && user_exists && command -v runuser >/dev/null; then
    runas=(runuser -u "$SVC_USER" --)
  fi
  if out="$(${runas[@]+"${runas[@]}"} env -i "${vars[@]}" "$CHECK_BIN" -t -c "$R$conf" 2>&1)"; then
    log "$out"
  else
    FAILED=1
    printf '%s\n' "$out" >&2
    warn "$unit: the configuration check failed: edit $conf and $ENV_FILE, then run this again"
  fi
done
if [ "$FAILED" = 1 ]; then
  warn "nothing enabled or started"
  exit 3
fi

# ---- 7. enable and start ---------------------------------------------------------------------
log "== enable and start"
ONLINE=0
[ -z "$R" ] && [ -d /run/systemd/system ] && ONLINE=1
if ! command -v systemctl >/dev/null; then
  warn "no systemctl: units not enabled"
  exit 0
fi
SCTL=(systemctl)
if [ -n "$R" ]; then SCTL=(systemctl --root="$R")
elif [ "$ONLINE" = 0 ]; then SCTL=(systemctl --root=/)
fi
# systemctl enable; offline, without the noise about multi-user.target not being in the root.
# shellcheck disable=SC2317  # called through run_q
enable_unit() {
  local out rc=0
  out="$("${SCTL[@]}" enable "$1" 2>&1)" || rc=$?
  printf '%s\n' "$out" | grep -v 'non-existent unit multi-user.target' || true
  return "$rc"
}
if [ "$ONLINE" = 1 ] && [ "$UNITS_CHANGED" = 1 ]; then
  act systemctl daemon-reload
fi
for c in "${CONFIGS[@]}"; do
  unit="${c%%|*}"
  if [ "$DRY" = 1 ] && [ ! -f "$R$UNIT_DIR/${unit/@*./@.}" ]; then
    act "${SCTL[@]}" enable "$unit"
  elif [ "$("${SCTL[@]}" is-enabled "$unit" 2>/dev/null || true)" = enabled ]; then
    log "unchanged: $unit enabled"
  else
    announce "${SCTL[*]} enable $unit"
    run_q enable_unit "$unit"
  fi
  if [ "$ONLINE" = 0 ] || [ "$START" = 0 ]; then
    continue
  fi
  if systemctl is-active --quiet "$unit"; then
    if [ "$BIN_CHANGED" = 1 ]; then
      act systemctl reload "$unit"
    else
      log "unchanged: $unit running"
    fi
    if [ "$UNITS_CHANGED" = 1 ]; then
      warn "$unit: the unit file changed; it applies at the next restart (systemctl restart $unit: drains first, see docs/operations.md)"
    fi
  else
    act systemctl start "$unit"
  fi
done
if [ -n "$R" ] || [ "$ONLINE" = 0 ]; then
  log "not started: $([ -n "$R" ] && echo "installed into $R" || echo "systemd is not running")"
fi
[ "$CHANGES" -gt 0 ] || log "nothing to do: already installed"
exit 0
