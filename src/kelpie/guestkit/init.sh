#!/bin/sh
# Kelpie guest init: PID 1 inside every micro-VM (busybox sh, from the kelpie initramfs).
#
# It mounts the kernel filesystems, loads the kernel modules the VM's devices need, applies
# the settings on the kernel command line, then runs the guest agent forever (restarting it
# if it dies). PID 1 must never exit: the kernel panics when it does.
#
# Kernel command line (all optional):
#   kelpie.hostname=NAME                    host name of the guest
#   kelpie.root=/dev/vda                    ext4 root disk, mounted at /newroot; the agent
#                                           then runs commands chrooted there
#   kelpie.mounts=TAG:PATH:ro|rw,...        virtio-9p shares (QEMU mount_tag TAG) mounted at
#                                           PATH (below /newroot when there is a root disk)
#   kelpie.sharefs=virtiofs                 the shares are virtio-fs (Virtualization.framework)
#   kelpie.net=ADDR/PREFIX,GATEWAY[,DNS]    static IPv4 set-up of eth0
#   kelpie.vsock=PORT                       the agent listens on vsock port PORT (VMMs with
#                                           a vsock device: Firecracker...) instead of the
#                                           virtio-serial port
#   virtio_mmio.device=...                  (added by Firecracker) passed on to virtio_mmio,
#                                           which init loads itself, so no modprobe reads it
#   kelpie.debug=1                          log every step to the console

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

AGENT_PORT=kelpie.agent
# The agent's script, compiled when the kit was built: Python runs it without parsing.
AGENT=/kelpie/guest/agent.pyc
NEWROOT=/newroot
MODULE_LISTS=/etc/kelpie
INIT_LOG=/run/kelpie/init.log
AGENT_FIFO=/run/kelpie/agent-device

hostname_arg=
root_arg=
mounts_arg=
net_arg=
vsock_arg=
sharefs=9p
mmio_params=
debug=0
early_agent=

log() {
    uptime=?
    [ -r /proc/uptime ] && IFS=' ' read -r uptime _ </proc/uptime
    echo "kelpie-init [$uptime]: $*"
    [ -d /run/kelpie ] && echo "[$uptime] $*" >>"$INIT_LOG"
}

debug() {
    [ "$debug" = 1 ] && log "$@"
}

# A step's time in init.log only (no console: under TCG each console byte is an exit to
# QEMU), for benchmarks/qemu_vm.py's phase table; with kelpie.debug=1 on the console too.
mark() {
    if [ "$debug" = 1 ]; then
        log "$@"
    elif [ -r /proc/uptime ]; then
        IFS=' ' read -r uptime _ </proc/uptime
        echo "[$uptime] $*" >>"$INIT_LOG"
    fi
}

mount_kernel_filesystems() {
    mount -t proc -o nosuid,nodev,noexec proc /proc
    mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
    mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
    mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
    mkdir -p /run/kelpie
    ln -sf /proc/self/fd /dev/fd
    ln -sf /proc/self/fd/0 /dev/stdin
    ln -sf /proc/self/fd/1 /dev/stdout
    ln -sf /proc/self/fd/2 /dev/stderr
}

read_cmdline() {
    set -f
    for word in $(cat /proc/cmdline); do
        case "$word" in
            kelpie.hostname=*) hostname_arg=${word#*=} ;;
            kelpie.root=*) root_arg=${word#*=} ;;
            kelpie.mounts=*) mounts_arg=${word#*=} ;;
            kelpie.net=*) net_arg=${word#*=} ;;
            kelpie.vsock=*) vsock_arg=${word#*=} ;;
            kelpie.sharefs=virtiofs) sharefs=virtiofs ;;
            virtio_mmio.device=*) mmio_params="$mmio_params ${word#virtio_mmio.}" ;;
            kelpie.debug=1) debug=1 ;;
        esac
    done
    set +f
}

# Each line of /etc/kelpie/modules.GROUP is "NAME PATH", dependencies first.
load_group() {
    [ -f "$MODULE_LISTS/modules.$1" ] || return 0
    while read -r name path; do
        [ -d "/sys/module/$name" ] && continue
        params=
        [ "$name" = virtio_mmio ] && params=$mmio_params
        debug "insmod $name$params"
        # shellcheck disable=SC2086  # one word per parameter
        insmod "$path" $params || log "could not load kernel module $name ($path)"
    done <"$MODULE_LISTS/modules.$1"
}

# Load drivers for the virtio devices that exist (virtio device IDs: 1 net, 2 block, 9 9p,
# 19 vsock, 26 virtio-fs). Virtio over PCI (Virtualization.framework) needs its transport
# first; micro-VMs without a PCI bus (QEMU microvm, Firecracker) skip it.
load_device_drivers() {
    load_group core
    [ -n "$(ls /sys/bus/pci/devices 2>/dev/null)" ] && load_group pci
    for id_file in /sys/bus/virtio/devices/*/device; do
        [ -f "$id_file" ] || continue
        case "$(cat "$id_file")" in
            0x0001) load_group net ;;
            0x0002) load_group blk ;;
            0x0009) load_group 9p ;;
            0x0013) load_group vsock ;;
            0x001a) load_group virtiofs ;;
        esac
    done
}

set_hostname() {
    name=${hostname_arg:-kelpie}
    hostname "$name"
    echo "$name" >/etc/hostname
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n127.0.1.1\t%s\n' "$name" >/etc/hosts
}

set_up_network() {
    ip link set lo up
    [ -n "$net_arg" ] || return 0
    old_ifs=$IFS
    IFS=,
    set -f
    set -- $net_arg
    set +f
    IFS=$old_ifs
    if ! ip link set eth0 up || ! ip addr add "$1" dev eth0; then
        log "could not configure eth0 with $1"
        return 0
    fi
    [ -n "$2" ] && ip route add default via "$2"
    [ -n "$3" ] && echo "nameserver $3" >/etc/resolv.conf
}

wait_for_path() {
    tries=0
    while [ ! -e "$1" ]; do
        tries=$((tries + 1))
        [ "$tries" -gt "$2" ] && return 1
        sleep 0.01
    done
    return 0
}

mount_root() {
    [ -n "$root_arg" ] || return 0
    mkdir -p "$NEWROOT"
    if ! wait_for_path "$root_arg" 500; then
        log "ERROR: root disk $root_arg did not appear"
        return 1
    fi
    # noinit_itable: the disk's inode tables were left unwritten (sparse, see
    # kelpie.images.make_ext4); zeroing them in the background would write them all.
    if ! mount -t ext4 -o noinit_itable "$root_arg" "$NEWROOT"; then
        log "ERROR: could not mount root disk $root_arg (ext4) at $NEWROOT"
        return 1
    fi
    for dir in proc sys dev dev/pts tmp; do
        mkdir -p "$NEWROOT/$dir"
        mount -o bind "/$dir" "$NEWROOT/$dir" || log "could not bind /$dir into $NEWROOT"
    done
    # Name resolution set up by init also applies to commands run in the root disk.
    if [ -f "$NEWROOT/etc/resolv.conf" ] && [ ! -L "$NEWROOT/etc/resolv.conf" ]; then
        mount -o bind /etc/resolv.conf "$NEWROOT/etc/resolv.conf"
    fi
    debug "root disk $root_arg mounted at $NEWROOT"
}

mount_shares() {
    [ -n "$mounts_arg" ] || return 0
    prefix=
    [ -n "$root_arg" ] && prefix=$NEWROOT
    old_ifs=$IFS
    IFS=,
    set -f
    for spec in $mounts_arg; do
        IFS=:
        set -- $spec
        IFS=,
        tag=$1 path=$2 mode=${3:-rw}
        case "$mode" in ro | rw) ;; *)
            log "ERROR: share $tag has mode '$mode', expected ro or rw; not mounted"
            continue ;;
        esac
        mkdir -p "$prefix$path"
        if [ "$sharefs" = virtiofs ]; then
            options=$mode
        else
            options="trans=virtio,version=9p2000.L,msize=262144,$mode"
        fi
        if mount -t "$sharefs" -o "$options" "$tag" "$prefix$path"; then
            debug "share $tag mounted at $prefix$path ($mode)"
        else
            log "ERROR: could not mount share $tag at $prefix$path"
        fi
    done
    set +f
    IFS=$old_ifs
}

# Prints the /dev node of the virtio-serial port named $AGENT_PORT, waiting up to 10 s.
find_agent_port() {
    tries=0
    while [ "$tries" -lt 1000 ]; do
        for name_file in /sys/class/virtio-ports/*/name; do
            [ -f "$name_file" ] || continue
            [ "$(cat "$name_file")" = "$AGENT_PORT" ] || continue
            port=${name_file%/name}
            port=${port##*/}
            if [ -e "/dev/$port" ]; then
                mkdir -p /dev/virtio-ports
                ln -sf "../$port" "/dev/virtio-ports/$AGENT_PORT"
                echo "/dev/$port"
                return 0
            fi
        done
        tries=$((tries + 1))
        sleep 0.01
    done
    return 1
}

agent_args() {
    # Even when the root disk failed to mount: commands then fail visibly in the empty
    # /newroot instead of silently running in the initramfs (the error is in init.log).
    [ -n "$root_arg" ] && echo --root "$NEWROOT"
}

# Python's start-up is most of a boot's agent time under TCG: start the agent now, so it
# imports while init loads modules and mounts disks on the other vCPU. It waits on a FIFO
# for the path of its port, written when the guest is ready (vsock agents start later).
start_agent_early() {
    [ -z "$vsock_arg" ] || return 0
    mkfifo "$AGENT_FIFO" || return 0
    # shellcheck disable=SC2046  # one word per argument
    python3 -E -S "$AGENT" --device-from "$AGENT_FIFO" $(agent_args) </dev/null &
    early_agent=$!
}

run_agent_forever() {
    if [ -n "$vsock_arg" ]; then
        device="vsock port $vsock_arg"
        set -- --listen-vsock "$vsock_arg"
    else
        device=$(find_agent_port)
        if [ -z "$device" ]; then
            log "ERROR: no virtio-serial port named $AGENT_PORT after 10 s; using /dev/vport0p1"
            device=/dev/vport0p1
        fi
        set -- --device "$device"
    fi
    # shellcheck disable=SC2046
    set -- "$@" $(agent_args)
    while :; do
        started=$(date +%s)
        log "agent starting on $device"
        if [ -n "$early_agent" ]; then
            # Held open (read-write never blocks) until the agent exits: the line waits
            # in the FIFO however late the agent opens it.
            exec 3<>"$AGENT_FIFO"
            echo "$device" >&3
            wait "$early_agent"
            status=$?
            exec 3>&-
            early_agent=
        else
            python3 -E -S "$AGENT" "$@" </dev/null
            status=$?
        fi
        # Restart at once after a long run, but do not spin if the agent cannot start.
        if [ $(($(date +%s) - started)) -lt 2 ]; then
            log "agent exited with status $status; restarting in 1 s"
            sleep 1
        else
            log "agent exited with status $status; restarting"
        fi
    done
}

mount_kernel_filesystems
read_cmdline
mark "init started"
start_agent_early
load_device_drivers
mark "kernel modules loaded"
set_hostname
set_up_network
mark "host name and network set"
mount_root
mount_shares
mark "disks mounted"
run_agent_forever
