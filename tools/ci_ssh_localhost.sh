#!/usr/bin/env bash
# CI only: passwordless ssh to this machine plus pdsh, so that the multi-node (hostfile) launch test can run two
# "nodes" (localhost and 127.0.0.1) on one machine. Best effort: without it that test is skipped.
set -eu
if ! command -v sshd >/dev/null 2>&1 && ! [ -x /usr/sbin/sshd ] || ! command -v pdsh >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client pdsh >/dev/null
fi
mkdir -p "$HOME/.ssh" /run/sshd && chmod 700 "$HOME/.ssh"
[ -f "$HOME/.ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$HOME/.ssh/id_ed25519"
grep -qF "$(cat "$HOME/.ssh/id_ed25519.pub")" "$HOME/.ssh/authorized_keys" 2>/dev/null \
  || cat "$HOME/.ssh/id_ed25519.pub" >> "$HOME/.ssh/authorized_keys"
chmod 600 "$HOME/.ssh/authorized_keys"
if ! ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=5 127.0.0.1 true 2>/dev/null; then
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password
fi
for host in localhost 127.0.0.1; do
  ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=5 "$host" true
done
echo "ssh to localhost: ready"
