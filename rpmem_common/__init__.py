"""What pmreplica's librpmem client (:mod:`pmreplica.rpmem`) and its agent
(:mod:`remote_agent`) share, as PMDK's rpmem_common is shared by librpmem and rpmemd: the
control protocol (``proto``), the TCP lanes' and heartbeat's wire format (``wire``), range
checksums (``checksum``), the lanes' TLS (``tls``) and the RDMA connection data and verbs
helpers (``verbs_common``). Neither side's code lives here, and nothing here imports it.
"""
