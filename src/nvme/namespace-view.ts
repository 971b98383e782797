// How a controller's host sees the subsystem's namespaces: under the NSIDs and identifiers a
// virtual subsystem gives them, or the physical ones. Built once per controller, since the I/O path
// looks a namespace up for every command; everything it answers is read at the time of asking.

import type { AttachedNamespace, NamespaceView } from './context.js';
import type { Namespace, NamespaceIds } from './namespace.js';

/**
 * How a host numbers and names the subsystem's namespaces. A virtual subsystem renumbers them and
 * derives their identifiers from its own definition; without one, hosts see the physical ones.
 */
export interface NamespaceNaming {
  /** The subsystem NSID behind host NSID `hostNsid`. */
  physical(hostNsid: number): number | undefined;
  /** The host NSID of the subsystem's namespace `nsid`, if the host can see it at all. */
  host(nsid: number): number | undefined;
  ids(hostNsid: number, namespace: Namespace): NamespaceIds;
  readonly maxNsid: number;
}

interface NamespaceViewSource {
  /** The naming the host sees now (null: the physical one). */
  naming(): NamespaceNaming | null;
  /** Subsystem NSIDs attached to the controller. */
  attached(): readonly number[];
  /** The subsystem's namespace `nsid` if it is attached to the controller. */
  attachedNamespace(nsid: number): Namespace | undefined;
  /** The subsystem's NSID limit. */
  maxNamespaces(): number;
}

export function createNamespaceView(source: NamespaceViewSource): NamespaceView {
  const attachedAs = (hostNsid: number, nsid: number): AttachedNamespace | undefined => {
    const namespace = source.attachedNamespace(nsid);
    if (!namespace) return undefined;
    const naming = source.naming();
    return { nsid: hostNsid, namespace, ids: naming ? naming.ids(hostNsid, namespace) : namespace.ids };
  };
  const physical = (hostNsid: number): number | undefined => {
    const naming = source.naming();
    return naming ? naming.physical(hostNsid) : hostNsid;
  };
  return {
    get: (hostNsid) => {
      const nsid = physical(hostNsid);
      return nsid === undefined ? undefined : attachedAs(hostNsid, nsid);
    },
    namespace: (hostNsid) => {
      const nsid = physical(hostNsid);
      return nsid === undefined ? undefined : source.attachedNamespace(nsid);
    },
    list: () => {
      const naming = source.naming();
      return source
        .attached()
        .map((nsid) => {
          const hostNsid = naming ? naming.host(nsid) : nsid;
          return hostNsid === undefined ? undefined : attachedAs(hostNsid, nsid);
        })
        .filter((a): a is AttachedNamespace => a !== undefined)
        .sort((a, b) => a.nsid - b.nsid);
    },
    get maxNsid() {
      return source.naming()?.maxNsid ?? source.maxNamespaces();
    },
  };
}
