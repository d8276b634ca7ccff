#!/usr/bin/env bash
# tests/vm/run-in-vm.sh -- run ONE command inside a throw-away cgroup v2 VM.
#
# Boots Debian's stock kernel (linux-image-amd64) under qemu.  The guest's
# root is the host's root filesystem, shared read-only over virtio-9p with a
# tmpfs overlay on top: every host path is visible at the same place, writes
# are allowed and discarded at power-off.  cgroup2 is mounted at
# /sys/fs/cgroup (memory controller on, +memory +pids enabled in the root's
# cgroup.subtree_control, PSI on), /tmp /run /dev/shm are fresh tmpfs.
# The command runs as root, in the caller's working directory, with the
# caller's PATH; its stdout/stderr stream back live and its exit status
# becomes ours.
#
# Usage:
#   tests/vm/run-in-vm.sh [--rw DIR]... [--env NAME]... [--] COMMAND [ARGS...]
#     --rw DIR    share host directory DIR read-write at the same path
#                 (results, junit xml, ...).  Repeatable.
#     --env NAME  copy host variable NAME into the guest.  Repeatable.
#   tests/vm/run-in-vm.sh --prepare   fetch kernel/busybox, build initramfs, exit
#
# Exit status: the command's; 125 if the VM ended without reporting one
# (boot failure, timeout, crash); 2 on bad usage.
#
# Knobs (environment, all optional):
#   OOMGUARD_VM_CACHE        cache dir   [${XDG_CACHE_HOME:-$HOME/.cache}/oomguard-vm]
#   OOMGUARD_VM_MEM          guest RAM, MiB                         [1024]
#   OOMGUARD_VM_CPUS         vCPUs                                  [2]
#   OOMGUARD_VM_ACCEL        kvm | tcg | auto                       [auto]
#   OOMGUARD_VM_TIMEOUT      seconds for the whole VM run (all boot attempts) [1200]
#   OOMGUARD_VM_BOOT_TIMEOUT seconds until guest init must have started [60]
#   OOMGUARD_VM_BOOT_RETRIES extra boot attempts after a stalled boot [2]
#   OOMGUARD_VM_KERNEL_PKG   Debian kernel package [the one linux-image-amd64 depends on]
#   OOMGUARD_VM_KERNEL + OOMGUARD_VM_MODULES  own kernel image + /lib/modules/<ver>
#   OOMGUARD_VM_PVH=0        boot the bzImage instead of the extracted PVH vmlinux
#   OOMGUARD_VM_APPEND       extra kernel command line (e.g. loglevel=7)
#   OOMGUARD_VM_RW           extra read-write dirs, ':'-separated (like --rw)
#   OOMGUARD_VM_HOST_TMP=1   guest /tmp = host /tmp (copy-on-write) instead of an
#                            empty tmpfs; automatic when run from under /tmp
#   OOMGUARD_VM_KEEP_JOB=1   keep the job dir (console.log, dmesg, qemu.log)
#   OOMGUARD_VM_WATCH_PID    also kill the VM when this process is gone
#   OOMGUARD_VM_QUIET=1      no progress lines on stderr
#   OOMGUARD_VM_QEMU / _MACHINE / _CPU_MODEL  qemu binary and tuning
set -euo pipefail

CACHE=${OOMGUARD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/oomguard-vm}
MEM=${OOMGUARD_VM_MEM:-1024}
CPUS=${OOMGUARD_VM_CPUS:-2}
ACCEL=${OOMGUARD_VM_ACCEL:-auto}
TIMEOUT=${OOMGUARD_VM_TIMEOUT:-1200}
BOOT_TIMEOUT=${OOMGUARD_VM_BOOT_TIMEOUT:-60}
BOOT_RETRIES=${OOMGUARD_VM_BOOT_RETRIES:-2}
QEMU=${OOMGUARD_VM_QEMU:-qemu-system-x86_64}
# Kernel modules the guest init loads (in order); anything built in is skipped.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         netfs fscache 9pnet 9pnet_virtio 9p overlay"
MODULES=$(echo $MODULES)

say() { [[ ${OOMGUARD_VM_QUIET:-0} == 1 ]] || echo "run-in-vm: $*" >&2; }
fail() { echo "run-in-vm: error: $*" >&2; exit 125; }

# ------------------------------------------------------------ downloads --
# apt-get download PKG into $CACHE/deb; on failure refresh the package lists
# once (stale lists point at kernel versions the mirror no longer has).
APT_UPDATED=0
apt_update_once() {
  [[ $APT_UPDATED == 1 ]] && return 0
  APT_UPDATED=1
  say "refreshing apt package lists"
  apt-get update -qq -o DPkg::Lock::Timeout=300 </dev/null >&2 || say "apt-get update failed"
}
fetch_deb() {   # fetch_deb PKG -> prints path of the .deb
  local pkg=$1 deb
  mkdir -p "$CACHE/deb"
  rm -f "$CACHE/deb/${pkg}"_*.deb
  if ! (cd "$CACHE/deb" && apt-get download -q "$pkg" </dev/null >&2 2>/dev/null); then
    apt_update_once
    (cd "$CACHE/deb" && apt-get download -q "$pkg" </dev/null >&2) || fail "apt-get download $pkg failed"
  fi
  deb=$(ls "$CACHE/deb/${pkg}"_*.deb 2>/dev/null | head -n1)
  [[ -n $deb ]] || fail "apt-get download $pkg left no .deb"
  echo "$deb"
}

kernel_package() {
  local pkg=${OOMGUARD_VM_KERNEL_PKG:-}
  [[ -n $pkg ]] && { echo "$pkg"; return; }
  # Reuse whatever kernel is already in the cache: no apt look-up at all.
  local d
  for d in "$CACHE"/kernel/linux-image-*/boot; do
    [[ -d $d ]] && pkg=${d%/boot} && pkg=${pkg##*/}
  done
  [[ -n $pkg ]] && { echo "$pkg"; return; }
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  if [[ -z $pkg ]]; then
    apt_update_once
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
          awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  fi
  [[ -n $pkg ]] || fail "cannot tell which kernel linux-image-amd64 depends on"
  echo "$pkg"
}

prepare_kernel() {
  if [[ -n ${OOMGUARD_VM_KERNEL:-} ]]; then
    KERNEL=$OOMGUARD_VM_KERNEL
    MODDIR=${OOMGUARD_VM_MODULES:?OOMGUARD_VM_MODULES=/lib/modules/<version> is needed too}
    return 0
  fi
  local pkg dir deb f base
  pkg=$(kernel_package)
  dir=$CACHE/kernel/$pkg
  if [[ ! -d $dir/boot ]]; then
    say "downloading kernel package $pkg"
    deb=$(fetch_deb "$pkg")
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    dpkg-deb -x "$deb" "$dir.tmp" || fail "cannot unpack $deb"
    # Keep only the handful of modules the init loads (saves ~300 MB).
    while IFS= read -r f; do
      base=${f##*/}; base=${base%%.ko*}
      [[ " $MODULES " == *" $base "* ]] || rm -f "$f"
    done < <(find "$dir.tmp/lib/modules" -name '*.ko*')
    rm -rf "$dir.tmp/usr" "$deb"
    mv "$dir.tmp" "$dir"
  fi
  KERNEL=$(ls "$dir"/boot/vmlinuz-* | head -n1)
  MODDIR=$(ls -d "$dir"/lib/modules/* | head -n1)
  # Booting the uncompressed ELF through its PVH entry point skips the
  # firmware/real-mode setup and the in-guest decompression: ~2 s faster
  # under TCG.  Extract once; remember when the kernel has no PVH note.
  if [[ ${OOMGUARD_VM_PVH:-1} == 1 ]]; then
    if [[ ! -s $dir/vmlinux.pvh && ! -e $dir/vmlinux.no-pvh ]]; then
      extract_pvh "$KERNEL" "$dir/vmlinux.pvh" || touch "$dir/vmlinux.no-pvh"
    fi
    [[ -s $dir/vmlinux.pvh ]] && KERNEL=$dir/vmlinux.pvh
  fi
  return 0
}

extract_pvh() {   # extract_pvh BZIMAGE OUT: write the embedded vmlinux if it has a PVH note
  local py
  py=$(command -v python3) || return 1
  "$py" - "$1" "$2" <<'EOF'
import lzma, os, shutil, struct, subprocess, sys, zlib

image, out = sys.argv[1], sys.argv[2]
blob = open(image, "rb").read()

def candidates():
    """Yield decompressed payloads for every compression magic found."""
    for magic, how in ((b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                       (b"\x1f\x8b\x08", "gzip")):
        at = blob.find(magic)
        if at < 0:
            continue
        try:
            if how == "xz":
                yield lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(blob[at:])
            elif how == "gzip":
                yield zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(blob[at:])
            elif shutil.which("zstd"):
                yield subprocess.run(["zstd", "-qdc"], input=blob[at:],
                                     capture_output=True).stdout
        except (lzma.LZMAError, zlib.error, OSError):
            pass

def has_pvh_note(elf):
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for n in range(e_phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, e_phoff + n * e_phentsize)
        if p_type != 4:                      # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:   # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False

for payload in candidates():
    if payload[:4] == b"\x7fELF" and payload[4] == 2 and has_pvh_note(payload):
        with open(out + ".%d" % os.getpid(), "wb") as f:
            f.write(payload)
        os.replace(out + ".%d" % os.getpid(), out)
        sys.exit(0)
sys.exit(1)
EOF
}

prepare_busybox() {
  BUSYBOX=$CACHE/busybox
  [[ -x $BUSYBOX ]] && return 0
  say "downloading busybox-static"
  local deb
  deb=$(fetch_deb busybox-static)
  rm -rf "$CACHE/busybox.x" && mkdir -p "$CACHE/busybox.x"
  dpkg-deb -x "$deb" "$CACHE/busybox.x" || fail "cannot unpack $deb"
  cp "$CACHE/busybox.x/bin/busybox" "$BUSYBOX.$$" && mv "$BUSYBOX.$$" "$BUSYBOX"
  rm -rf "$CACHE/busybox.x" "$deb"
}

# ------------------------------------------------------------ guest init --
# PID 1 in the guest (busybox sh).  Host -> guest: /job/env (sourced).
# Guest -> host: /job/booted (watchdog), /job/out, /job/err, /job/status, /job/dmesg.
INIT_SCRIPT='#!/bin/sh
export PATH=/bin
mount -t proc none /proc; mount -t sysfs none /sys; mount -t devtmpfs none /dev
off() { sync; poweroff -f; echo o > /proc/sysrq-trigger; sleep 10; }
die() { echo "oomguard-vm init: $*" > /dev/console; dmesg > /job/dmesg 2>/dev/null; off; }
while read -r m; do insmod /modules/$m.ko || die "insmod $m"; done < /modules.list
P9="trans=virtio,version=9p2000.L,msize=262144"
mkdir -p /job /host /ovl /newroot
mount -t 9p -o $P9,cache=none job /job || die "cannot mount the job dir"
echo > /job/booted
. /job/env
mount -t 9p -o $P9,ro,cache=loose host /host || die "cannot mount the host root"
mount -t tmpfs -o mode=0755 ovl /ovl; mkdir /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot ||
  die "cannot mount the overlay"
R=/newroot
mount -t proc proc $R/proc; mount -t sysfs sysfs $R/sys; mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=0755 run $R/run
[ "$HOST_TMP" = 1 ] || mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || die "cannot mount cgroup2"
echo "+memory +pids" > $R/sys/fs/cgroup/cgroup.subtree_control ||
  die "cannot enable +memory in the root cgroup"
mkdir -p $R/run/vmjob && mount --bind /job $R/run/vmjob
n=0
for d in $RW_DIRS; do
  mkdir -p $R$d && mount -t 9p -o $P9,cache=mmap rw$n $R$d || die "cannot mount $d"
  n=$((n + 1))
done
hostname oomguard-vm; ifconfig lo 127.0.0.1 up 2>/dev/null
env -i chroot $R /bin/bash --noprofile --norc /run/vmjob/cmd.sh \
  </dev/null >/job/out 2>/job/err
echo $? > /job/status.tmp
dmesg > /job/dmesg 2>/dev/null
mv /job/status.tmp /job/status
off
'

prepare() {   # serialise concurrent first runs on the shared cache
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9
  prepare_initrd
  exec 9>&-
}

prepare_initrd() {
  prepare_kernel
  prepare_busybox
  local kver key tree m f
  kver=${MODDIR##*/}
  key=$(printf '%s\n' "$kver" "$MODULES" "$INIT_SCRIPT" | md5sum | cut -c1-12)
  INITRD=$CACHE/initrd-$kver-$key.cpio
  [[ -s $INITRD ]] && return 0
  say "building initramfs for $kver"
  tree=$(mktemp -d "$CACHE/initrd.XXXXXX")
  mkdir -p "$tree"/{bin,modules,proc,sys,dev,job,tmp}
  cp "$BUSYBOX" "$tree/bin/busybox"
  for f in sh mount insmod mkdir cat echo sync poweroff sleep env chroot hostname \
           ifconfig dmesg mv; do
    ln -s busybox "$tree/bin/$f"
  done
  : > "$tree/modules.list"
  for m in $MODULES; do
    f=$(find "$MODDIR/kernel" -name "$m.ko*" 2>/dev/null | head -n1)
    if [[ -z $f ]]; then
      grep -q "/$m\.ko" "$MODDIR/modules.builtin" 2>/dev/null ||
        fail "module $m is neither in $MODDIR nor built in"
      continue
    fi
    case $f in
      *.ko)     cp "$f" "$tree/modules/$m.ko" ;;
      *.ko.xz)  xz -dc "$f" > "$tree/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" > "$tree/modules/$m.ko" ;;
      *.ko.gz)  gzip -dc "$f" > "$tree/modules/$m.ko" ;;
      *) fail "unknown module format: $f" ;;
    esac
    echo "$m" >> "$tree/modules.list"
  done
  printf '%s' "$INIT_SCRIPT" > "$tree/init"
  chmod 0755 "$tree/init"
  (cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$INITRD.$$"
  mv "$INITRD.$$" "$INITRD"
  rm -rf "$tree"
}

# ----------------------------------------------------------------- main --
RW=()
ENVS=()
IFS=: read -r -a extra_rw <<< "${OOMGUARD_VM_RW:-}"
for d in "${extra_rw[@]}"; do [[ -n $d ]] && RW+=("$d"); done
while (($#)); do
  case $1 in
    --rw) (($# >= 2)) || { echo "run-in-vm: --rw needs a directory" >&2; exit 2; }
          RW+=("$2"); shift 2 ;;
    --env) (($# >= 2)) || { echo "run-in-vm: --env needs a name" >&2; exit 2; }
           ENVS+=("$2"); shift 2 ;;
    --prepare) prepare
               echo "kernel: $KERNEL"; echo "initrd: $INITRD"; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) echo "run-in-vm: unknown option $1 (use -- before the command)" >&2; exit 2 ;;
    *) break ;;
  esac
done
(($#)) || { echo "usage: $0 [--rw DIR]... [--env NAME]... [--] COMMAND [ARGS...]" >&2; exit 2; }
for i in "${!RW[@]}"; do
  [[ -d ${RW[$i]} ]] || fail "--rw ${RW[$i]}: not a directory"
  RW[$i]=$(realpath "${RW[$i]}")
  [[ ${RW[$i]} != *[[:space:]]* ]] || fail "--rw ${RW[$i]}: spaces are not supported"
done
command -v "$QEMU" >/dev/null || fail "$QEMU not found (apt-get install qemu-system-x86)"
command -v cpio >/dev/null || fail "cpio not found (apt-get install cpio)"

prepare

if [[ $ACCEL == auto ]]; then
  # A real KVM needs VMX/SVM.  A paravirtual /dev/kvm (kvm_pvm module, as on
  # nested cloud VMs) cannot boot a stock kernel: use TCG there.
  ACCEL=tcg
  if [[ -r /dev/kvm && -w /dev/kvm && ! -d /sys/module/kvm_pvm ]] &&
     grep -qwE 'vmx|svm' /proc/cpuinfo; then ACCEL=kvm; fi
fi
if [[ $ACCEL == kvm ]]; then
  ACCEL_ARGS=(-accel kvm -cpu "${OOMGUARD_VM_CPU_MODEL:-host}")
else
  ACCEL_ARGS=(-accel "tcg,thread=multi" -cpu "${OOMGUARD_VM_CPU_MODEL:-max}")
fi

JOB=$(mktemp -d "${TMPDIR:-/tmp}/oomguard-vm.XXXXXX")
QPID='' TAILS='' WATCH=''
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM HUP
  if [[ -n $QPID ]]; then kill -TERM "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; fi
  [[ -n $TAILS ]] && kill $TAILS 2>/dev/null
  [[ -n $WATCH ]] && kill "$WATCH" 2>/dev/null
  if [[ ${OOMGUARD_VM_KEEP_JOB:-0} == 1 ]]; then say "job dir kept: $JOB"; else rm -rf "$JOB"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# The command file: caller's cwd, PATH and chosen variables.
{
  echo "export HOME=/root TMPDIR=/tmp LANG=C.UTF-8 TERM=dumb OOMGUARD_IN_VM=1"
  echo "export PATH=$(printf %q "$PATH")"
  for e in "${ENVS[@]}"; do
    [[ -v $e ]] && echo "export $e=$(printf %q "${!e}")"
  done
  echo "cd $(printf %q "$PWD") || exit 126"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$JOB/cmd.sh"
# A fresh tmpfs /tmp would hide the host's /tmp: keep the host's (copy-on-write)
# when the command runs from under it or when asked to.
HOST_TMP=${OOMGUARD_VM_HOST_TMP:-0}
[[ $PWD == /tmp || $PWD == /tmp/* ]] && HOST_TMP=1
{ echo "RW_DIRS=\"${RW[*]}\""; echo "HOST_TMP=$HOST_TMP"; } > "$JOB/env"

SHARES=(-fsdev "local,id=host,path=/,security_model=none,readonly=on,multidevs=remap"
        -device "virtio-9p-pci,fsdev=host,mount_tag=host"
        -fsdev "local,id=job,path=$JOB,security_model=none"
        -device "virtio-9p-pci,fsdev=job,mount_tag=job")
for i in "${!RW[@]}"; do
  SHARES+=(-fsdev "local,id=rw$i,path=${RW[$i]},security_model=none,multidevs=remap"
           -device "virtio-9p-pci,fsdev=rw$i,mount_tag=rw$i")
done

# loglevel=3 keeps the kernel's OOM reports (pr_err) off the slow serial
# console; they are still in the guest's dmesg (saved to the job dir).
CMDLINE="console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init mitigations=off"
CMDLINE+=" cgroup_no_v1=all psi=1 random.trust_cpu=on tsc=reliable no_timer_check"
CMDLINE+=" ${OOMGUARD_VM_APPEND:-}"

monitor_dump() {   # vCPU registers via the HMP monitor, for stalled boots
  local py
  py=$(command -v python3) || return 0
  "$py" - "$JOB/monitor.sock" > "$JOB/stall-$1.txt" 2>&1 <<'EOF' || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(3)
s.connect(sys.argv[1])
for cmd in (b"info cpus\n", b"info registers -a\n"):
    s.sendall(cmd)
    time.sleep(0.5)
buf = b""
try:
    while chunk := s.recv(65536):
        buf += chunk
except OSError:
    pass
print(buf.decode(errors="replace"))
EOF
  grep -E '^[* ] CPU|^RIP' "$JOB/stall-$1.txt" | head -n 8 >&2 || true
}

# If this script (or the caller named by OOMGUARD_VM_WATCH_PID) is SIGKILLed,
# no trap runs: a watcher kills qemu once either is gone.
watch_parent() {
  local p
  while :; do
    for p in "$@"; do kill -0 "$p" 2>/dev/null || break 2; done
    sleep 1
  done
  [[ -s $JOB/qemu.pid ]] && kill -KILL "$(cat "$JOB/qemu.pid")" 2>/dev/null
}
watch_parent $$ ${OOMGUARD_VM_WATCH_PID:-} </dev/null >/dev/null 2>&1 &
WATCH=$!

T0=$(date +%s%N)
END=$((SECONDS + TIMEOUT))
attempt=0
QRC=0
while :; do
  attempt=$((attempt + 1))
  left=$((END - SECONDS))
  ((left > 0)) || { say "overall timeout (${TIMEOUT}s) reached before boot attempt $attempt"; break; }
  rm -f "$JOB/booted" "$JOB/status" "$JOB/monitor.sock" "$JOB/qemu.pid"
  : > "$JOB/out"; : > "$JOB/err"
  timeout -k 5 "$left" "$QEMU" -name oomguard-vm -machine "${OOMGUARD_VM_MACHINE:-q35}" \
    "${ACCEL_ARGS[@]}" -m "$MEM" -smp "$CPUS" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" \
    -pidfile "$JOB/qemu.pid" \
    -monitor "unix:$JOB/monitor.sock,server=on,wait=off" \
    -serial "file:$JOB/console.log" "${SHARES[@]}" \
    </dev/null >"$JOB/qemu.log" 2>&1 &
  QPID=$!
  tail -s 0.2 --pid="$QPID" -n +1 -f "$JOB/out" &
  TAILS=$!
  tail -s 0.2 --pid="$QPID" -n +1 -f "$JOB/err" >&2 &
  TAILS+=" $!"
  stalled=0
  boot_end=$((SECONDS + BOOT_TIMEOUT))
  while [[ ! -e $JOB/booted ]] && kill -0 "$QPID" 2>/dev/null; do
    if ((SECONDS >= boot_end)); then
      say "guest init not up after ${BOOT_TIMEOUT}s (attempt $attempt); vCPU state:"
      monitor_dump "$attempt"
      cp "$JOB/console.log" "$JOB/console-attempt-$attempt.log" 2>/dev/null || true
      [[ -e $JOB/booted ]] && break
      stalled=1
      kill -TERM "$QPID" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  set +e
  wait "$QPID"; QRC=$?
  wait $TAILS
  set -e
  QPID='' TAILS=''
  ((stalled && attempt <= BOOT_RETRIES)) || break
  say "booting again"
done
say "VM ($ACCEL, ${MEM} MiB, $CPUS vCPU) wall time $((($(date +%s%N) - T0) / 1000000)) ms"

if [[ -s $JOB/status ]]; then
  exit "$(cat "$JOB/status")"
fi
if ((stalled)); then
  echo "run-in-vm: error: the guest did not boot in $attempt attempt(s) (OOMGUARD_VM_BOOT_TIMEOUT=${BOOT_TIMEOUT}s)" >&2
elif ((SECONDS >= END)); then
  echo "run-in-vm: error: VM killed by the ${TIMEOUT}s timeout (OOMGUARD_VM_TIMEOUT)" >&2
elif ((QRC > 128)); then
  echo "run-in-vm: error: qemu was killed by signal $((QRC - 128))" >&2
else
  echo "run-in-vm: error: VM ended without an exit status (qemu status $QRC)" >&2
fi
echo "--- qemu log (tail) ---" >&2; tail -n 5 "$JOB/qemu.log" >&2 || true
echo "--- console (tail) ---" >&2; tail -n 40 "$JOB/console.log" >&2 || true
if [[ -s $JOB/dmesg ]]; then echo "--- guest dmesg (tail) ---" >&2; tail -n 20 "$JOB/dmesg" >&2; fi
exit 125
