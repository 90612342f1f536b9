//! How a service's TLS mode changes without failing a request.
//!
//! A service's mode is translated twice: into its callers' outbound clusters (what they send) and
//! into its own sidecars' inbound listeners (what they accept). Both cannot change at the same
//! instant on every proxy, so a change rolls out in steps, each published on its own and given
//! time to reach every proxy before the next: servers first widen to `permissive` (accepting
//! mTLS and plaintext), then callers switch to the new mode, then servers narrow to it. At every
//! moment, whatever a caller may still send (the old or the new client mode) is accepted.

use serde::Serialize;

use crate::model::TlsMode;

/// The modes in effect for a service's callers (`client`) and its sidecars (`server`). They
/// differ only while a change rolls out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct TlsState {
    /// What callers send: translated into the service's outbound cluster.
    pub client: TlsMode,
    /// What its sidecars accept: translated into their inbound listeners (and the endpoint marks
    /// permissive callers read).
    pub server: TlsMode,
}

impl TlsState {
    /// Both sides in `mode`.
    pub fn settled(mode: TlsMode) -> TlsState {
        TlsState {
            client: mode,
            server: mode,
        }
    }

    /// Whether no change is rolling out.
    pub fn is_settled(self) -> bool {
        self.client == self.server
    }

    /// The next state on the way to `target`: callers change only while servers accept both
    /// kinds of traffic (`permissive`); servers narrow only once callers are in the target mode.
    pub fn step(self, target: TlsMode) -> TlsState {
        if self.client != target {
            if self.server == TlsMode::Permissive {
                TlsState {
                    client: target,
                    ..self
                }
            } else {
                TlsState {
                    server: TlsMode::Permissive,
                    ..self
                }
            }
        } else {
            TlsState::settled(target)
        }
    }
}

/// Whether servers in mode `server` accept what callers in mode `client` send to them. Callers in
/// `permissive` send mTLS to endpoints marked as accepting it, which only permissive servers'
/// endpoints are, and plaintext to the rest: a strict server refuses them.
pub fn accepts(server: TlsMode, client: TlsMode) -> bool {
    matches!(
        (server, client),
        (TlsMode::Permissive, _)
            | (TlsMode::None, TlsMode::None | TlsMode::Permissive)
            | (TlsMode::Strict, TlsMode::Strict)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [TlsMode; 3] = [TlsMode::None, TlsMode::Permissive, TlsMode::Strict];

    /// From any state a rollout may leave behind (settled, or part way to another target), every
    /// target is reached in at most three steps, and across each step every client mode that may
    /// still be in use (before or after) is accepted by every server mode that may be in use.
    #[test]
    fn every_rollout_reaches_its_target_and_never_refuses_a_caller() {
        let mut starts: Vec<TlsState> = MODES.iter().map(|m| TlsState::settled(*m)).collect();
        for from in MODES {
            for to in MODES {
                let mut s = TlsState::settled(from);
                for _ in 0..3 {
                    s = s.step(to);
                    starts.push(s);
                }
            }
        }
        for start in starts {
            assert!(accepts(start.server, start.client), "{start:?}");
            for target in MODES {
                let mut s = start;
                let mut steps = 0;
                while s != TlsState::settled(target) {
                    let next = s.step(target);
                    for server in [s.server, next.server] {
                        for client in [s.client, next.client] {
                            assert!(
                                accepts(server, client),
                                "{start:?} → {target:?}: {s:?} → {next:?} refuses {client:?} at a {server:?} server"
                            );
                        }
                    }
                    s = next;
                    steps += 1;
                    assert!(steps <= 3, "{start:?} → {target:?} does not converge");
                }
            }
        }
    }

    #[test]
    fn none_to_strict_widens_servers_then_switches_callers_then_narrows() {
        let mut s = TlsState::settled(TlsMode::None);
        let mut path = vec![];
        while s != TlsState::settled(TlsMode::Strict) {
            s = s.step(TlsMode::Strict);
            path.push((s.client, s.server));
        }
        use TlsMode::*;
        assert_eq!(
            path,
            [(None, Permissive), (Strict, Permissive), (Strict, Strict)]
        );
        assert!(!TlsState {
            client: None,
            server: Permissive
        }
        .is_settled());
    }
}
