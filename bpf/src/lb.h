/* The load balancer's layouts (bpf/maps.py mirrors them, byte for byte), after Cilium's lb4 maps.
 *
 * A frontend (ClusterIP, port, protocol) is the service entry, slot 0: how many backends it has and its reverse-NAT
 * index; slots 1..count each name one backend by id. Backends are shared by every frontend that uses them. The
 * reverse-NAT index gives back the frontend, so that a reply is seen as coming from it. */
#ifndef CLUSTERMESH_LB_H
#define CLUSTERMESH_LB_H

#include <linux/types.h>

struct lb_key {
	__u32 address; /* network order */
	__u16 port;    /* network order */
	__u8 protocol; /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 pad;
	__u16 slot; /* 0: the service entry; 1..count: a backend */
	__u16 pad2;
};
struct lb_service {
	__u32 backend_id; /* slot > 0 */
	__u16 count;      /* slot 0: backends for new connections (0: refuse them) */
	__u16 rev_nat;    /* slot 0: the frontend's reverse-NAT index */
};

struct lb_backend {
	__u32 address; /* network order */
	__u16 port;    /* network order */
	__u8 protocol;
	__u8 flags;
	__u16 cluster_id;
	__u16 pad;
};

struct lb_revnat {
	__u32 address; /* network order */
	__u16 port;    /* network order */
	__u16 pad;
};

/* A socket's translation, so that what it receives (recvmsg, getpeername) is seen as from the frontend. */
struct lb_sk_key {
	__u64 cookie;  /* the socket's */
	__u32 address; /* the backend's, network order */
	__u16 port;
	__u16 pad;
};
struct lb_sk_value {
	__u32 address; /* the frontend's */
	__u16 port;
	__u16 rev_nat;
};

/* The per-packet path: a flow to a frontend that no socket program translated (a process outside the node's
 * cgroup, a raw socket), NATed at the pod's veth. Forward: (client, frontend) -> the backend it got; reverse:
 * (client, backend) -> the frontend, to give replies back their source. */
struct lb_flow_key {
	__u32 client;      /* network order */
	__u32 peer;        /* forward: the frontend; reverse: the backend */
	__u16 client_port; /* network order */
	__u16 peer_port;
	__u8 protocol;
	__u8 reverse;
	__u16 pad;
};
struct lb_flow_value {
	__u32 address; /* forward: the backend; reverse: the frontend */
	__u16 port;
	__u16 rev_nat;
};

/* cm_lb_counters: what the socket programs did. */
/* A socket's translation, told to the agent (Hubble's trace-sock): which frontend went to which backend, for which
 * socket of which network namespace (the agent knows each pod's). */
struct sock_event {
	__u64 time_ns;      /* bpf_ktime_get_ns */
	__u64 socket_cookie;
	__u64 netns_cookie; /* the caller's network namespace: its pod */
	__u32 frontend;     /* network order */
	__u32 backend;      /* network order; 0 when there was no backend */
	__u16 frontend_port; /* network order */
	__u16 backend_port;
	__u32 backend_id;
	__u16 rev_nat;
	__u16 cluster_id;   /* the backend's cluster */
	__u8 protocol;
	__u8 verdict;       /* SOCK_TRANSLATED, SOCK_NO_BACKEND */
	__u8 pad[6];
};
#define SOCK_TRANSLATED 0
#define SOCK_NO_BACKEND 1

#define LB_TRANSLATED 0
#define LB_NO_BACKEND 1 /* a connection or datagram to a service with no backend: refused at once */
#define LB_REVERSED 2
#define LB_STALE 3 /* a socket's translation whose frontend is gone or changed */
#define LB_PACKET_NAT 4 /* a flow translated per packet, at the pod's veth */
#define LB_COUNTERS 5

#endif
