// Shell helpers for guest scripts and the key=value lines they print.

/** key=value lines a guest script printed. */
export const fields = (text: string): Map<string, string> =>
  new Map(
    text.split('\n').flatMap((line) => {
      const m = /^([\w.-]+)=(.*)$/.exec(line.trim());
      return m ? [[m[1]!, m[2]!] as [string, string]] : [];
    }),
  );

/** dev_for_nsid/wait_dev: a namespace's block device by NSID, whatever Linux named it; json: one field of nvme-cli's JSON. */
export const HELPERS = `
dev_for_nsid() { for b in /sys/block/nvme*n*; do case \${b##*/} in *c*) continue;; esac; [ -e "$b/nsid" ] && [ "$(cat $b/nsid)" = "$1" ] && { echo /dev/\${b##*/}; return 0; }; done; return 1; }
wait_dev() { i=0; while ! dev_for_nsid $1 >/dev/null; do i=$((i+1)); [ $i -gt 300 ] && { echo "no namespace $1" >&2; ls /sys/block >&2; return 1; }; sleep 0.1; done; dev_for_nsid $1; }
json() { grep "\\"$2\\"" $1 | head -n1 | sed 's/^[^:]*: *//; s/[",]//g'; }
`;

