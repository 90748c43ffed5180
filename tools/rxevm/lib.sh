# Sourced by run, check and build-cache: which kernel the guest boots and where its images live.

RXEVM_DIR=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")

# The newest kernel that has both an image in /boot and an rdma_rxe module. Not `uname -r`:
# a container's host kernel usually has no /lib/modules here (this one runs 6.18 without any).
rxevm_kver() {
    if [ -n "${RXEVM_KVER:-}" ]; then
        echo "$RXEVM_KVER"
        return
    fi
    local image
    for image in /boot/vmlinuz-*; do
        [ -f "$image" ] || continue
        modprobe -S "${image#/boot/vmlinuz-}" --show-depends rdma_rxe >/dev/null 2>&1 &&
            echo "${image#/boot/vmlinuz-}"
    done | sort -V | tail -n 1
}

# One folder per kernel version: vmlinux and initramfs.cpio.gz.
rxevm_cache_dir() {
    echo "${RXEVM_CACHE:-$RXEVM_DIR/cache}/$1"
}
