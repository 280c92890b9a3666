#!/bin/sh
# pre-mount hook 85, before OpenZFS's zfs-load-key.sh (90): fetch the key of the
# root dataset's encryption root from the key server when it cannot be typed (raw) or
# OpenZFS would not ask for it (keylocation is not prompt). On any failure it returns
# quietly and OpenZFS's hook goes on as usual. A key that can be typed is left to
# OpenZFS's prompt, which the password agent answers (see module-setup.sh).
# zfs_unlock_agent.deadline=SECONDS on the kernel command line bounds how long the
# agent tries the servers (default 30).

# shellcheck disable=SC1091 # installed by OpenZFS's dracut module
. /lib/dracut-zfs-lib.sh

decode_root_args || return 0

# The pools are imported by zfs-import-*.service, which may still be running.
while ! systemctl is-active --quiet zfs-import.target; do
	systemctl is-failed --quiet zfs-import-cache.service zfs-import-scan.service && return 0
	sleep 0.1
done

# shellcheck disable=SC2154 # root= is parsed by dracut
zua_bootfs="$root"
if [ "$zua_bootfs" = "zfs:AUTO" ]; then
	zua_bootfs="$(zpool get -Ho value bootfs | grep -m1 -vFx -)"
fi
zua_root="$(zfs get -Ho value encryptionroot "$zua_bootfs" 2>/dev/null)" || return 0
[ -n "$zua_root" ] && [ "$zua_root" != "-" ] || return 0
[ "$(zfs get -Ho value keystatus "$zua_root")" = "unavailable" ] || return 0
zua_typable="$(zfs get -Ho value keyformat,keylocation "$zua_root" | tr '\n' ' ')"
case "$zua_typable" in
"hex prompt " | "passphrase prompt ") return 0 ;;
esac

zua_deadline="$(getarg zfs_unlock_agent.deadline=)"
# A typo on the kernel command line must not cost the automatic unlock.
case "$zua_deadline" in
'' | *[!0-9.]* | *.*.* | .* | *. | 0) zua_deadline=30 ;;
esac
systemctl start network-online.target
if ! /usr/sbin/zfs-unlock-agent unlock --no-mount --deadline "$zua_deadline" \
	--dataset "$zua_root"; then
	warn "zfs-unlock-agent: no key for $zua_root from the key server; asking for it instead"
fi
return 0
