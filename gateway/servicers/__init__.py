"""The servicers: one per proto service, holding the gateway's logic for gRPC and REST alike."""
