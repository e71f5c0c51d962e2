//! Typed bit sets over the `uint64` capability and flag fields (CAP-1..CAP-5).
//!
//! The wire fields are plain `u64`. These sets name the bits; convert with `bits()` and
//! `from_bits_retain` (keeps bits this version does not know, so a newer peer's bits survive)
//! or `from_bits_truncate` (drops them). Reserved bits must be sent as 0 (CAP-5): a set built
//! from the named constants never has them.

use bitflags::bitflags;

use crate::v1;

bitflags! {
    /// Bits of `AgentToServer.capabilities` (checklist 2.3, 3.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AgentCapabilitySet: u64 {
        /// The agent reports status. Every agent MUST set it (CAP-1).
        const REPORTS_STATUS = v1::AgentCapabilities::ReportsStatus as u64;
        /// The agent accepts remote configuration (RC-2).
        const ACCEPTS_REMOTE_CONFIG = v1::AgentCapabilities::AcceptsRemoteConfig as u64;
        /// The agent reports its effective configuration (EFF-1).
        const REPORTS_EFFECTIVE_CONFIG = v1::AgentCapabilities::ReportsEffectiveConfig as u64;
        /// The agent accepts package offers (PKG-2).
        const ACCEPTS_PACKAGES = v1::AgentCapabilities::AcceptsPackages as u64;
        /// The agent reports package statuses.
        const REPORTS_PACKAGE_STATUSES = v1::AgentCapabilities::ReportsPackageStatuses as u64;
        /// The agent can send its own traces to an offered destination.
        const REPORTS_OWN_TRACES = v1::AgentCapabilities::ReportsOwnTraces as u64;
        /// The agent can send its own metrics to an offered destination.
        const REPORTS_OWN_METRICS = v1::AgentCapabilities::ReportsOwnMetrics as u64;
        /// The agent can send its own logs to an offered destination.
        const REPORTS_OWN_LOGS = v1::AgentCapabilities::ReportsOwnLogs as u64;
        /// The agent accepts OpAMP connection settings offers.
        const ACCEPTS_OPAMP_CONNECTION_SETTINGS =
            v1::AgentCapabilities::AcceptsOpAmpConnectionSettings as u64;
        /// The agent accepts settings for other connections.
        const ACCEPTS_OTHER_CONNECTION_SETTINGS =
            v1::AgentCapabilities::AcceptsOtherConnectionSettings as u64;
        /// The agent executes the Restart command (CMD-2).
        const ACCEPTS_RESTART_COMMAND = v1::AgentCapabilities::AcceptsRestartCommand as u64;
        /// The agent reports health (HLT-7).
        const REPORTS_HEALTH = v1::AgentCapabilities::ReportsHealth as u64;
        /// The agent reports remote config status (RC-7).
        const REPORTS_REMOTE_CONFIG = v1::AgentCapabilities::ReportsRemoteConfig as u64;
        /// The agent sends heartbeats (HB-1).
        const REPORTS_HEARTBEAT = v1::AgentCapabilities::ReportsHeartbeat as u64;
        /// The agent reports available components (AVC-1).
        const REPORTS_AVAILABLE_COMPONENTS =
            v1::AgentCapabilities::ReportsAvailableComponents as u64;
        /// The agent reports connection settings status (CSS-1).
        const REPORTS_CONNECTION_SETTINGS_STATUS =
            v1::AgentCapabilities::ReportsConnectionSettingsStatus as u64;
    }
}

bitflags! {
    /// Bits of `ServerToAgent.capabilities` (checklist 2.3, 3.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ServerCapabilitySet: u64 {
        /// The server accepts status reports. Every server MUST set it (CAP-3).
        const ACCEPTS_STATUS = v1::ServerCapabilities::AcceptsStatus as u64;
        /// The server may offer remote configuration.
        const OFFERS_REMOTE_CONFIG = v1::ServerCapabilities::OffersRemoteConfig as u64;
        /// The server accepts effective configuration reports.
        const ACCEPTS_EFFECTIVE_CONFIG = v1::ServerCapabilities::AcceptsEffectiveConfig as u64;
        /// The server may offer packages.
        const OFFERS_PACKAGES = v1::ServerCapabilities::OffersPackages as u64;
        /// The server accepts package statuses.
        const ACCEPTS_PACKAGES_STATUS = v1::ServerCapabilities::AcceptsPackagesStatus as u64;
        /// The server may offer connection settings.
        const OFFERS_CONNECTION_SETTINGS =
            v1::ServerCapabilities::OffersConnectionSettings as u64;
        /// The server handles connection settings requests (CSR flow).
        const ACCEPTS_CONNECTION_SETTINGS_REQUEST =
            v1::ServerCapabilities::AcceptsConnectionSettingsRequest as u64;
    }
}

bitflags! {
    /// Bits of `AgentToServer.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AgentToServerFlagSet: u64 {
        /// The agent asks the server for a new instance uid (UID-5).
        const REQUEST_INSTANCE_UID = v1::AgentToServerFlags::RequestInstanceUid as u64;
    }
}

bitflags! {
    /// Bits of `ServerToAgent.flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ServerToAgentFlagSet: u64 {
        /// The server asks for a full status report (SEQ-2, SEQ-3).
        const REPORT_FULL_STATE = v1::ServerToAgentFlags::ReportFullState as u64;
        /// The server asks for the full available-components map (AVC-4).
        const REPORT_AVAILABLE_COMPONENTS =
            v1::ServerToAgentFlags::ReportAvailableComponents as u64;
    }
}

macro_rules! from_enum {
    ($set:ty, $enum:ty) => {
        impl From<$enum> for $set {
            /// The set holding just this bit (empty for `Unspecified`).
            fn from(bit: $enum) -> Self {
                Self::from_bits_retain(bit as u64)
            }
        }
    };
}
from_enum!(AgentCapabilitySet, v1::AgentCapabilities);
from_enum!(ServerCapabilitySet, v1::ServerCapabilities);
from_enum!(AgentToServerFlagSet, v1::AgentToServerFlags);
from_enum!(ServerToAgentFlagSet, v1::ServerToAgentFlags);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_spec_values() {
        assert_eq!(AgentCapabilitySet::REPORTS_STATUS.bits(), 0x1);
        assert_eq!(AgentCapabilitySet::ACCEPTS_RESTART_COMMAND.bits(), 0x400);
        assert_eq!(
            AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS.bits(),
            0x8000
        );
        assert_eq!(AgentCapabilitySet::all().bits(), 0xFFFF);
        assert_eq!(ServerCapabilitySet::all().bits(), 0x7F);
        assert_eq!(AgentToServerFlagSet::all().bits(), 0x1);
        assert_eq!(ServerToAgentFlagSet::all().bits(), 0x3);
    }

    #[test]
    fn cap_5_unknown_bits_survive_retain_and_drop_with_truncate() {
        let wire = 0x1_0001u64;
        assert_eq!(AgentCapabilitySet::from_bits_retain(wire).bits(), wire);
        assert_eq!(
            AgentCapabilitySet::from_bits_truncate(wire),
            AgentCapabilitySet::REPORTS_STATUS
        );
        assert_eq!(AgentCapabilitySet::from_bits(wire), None);
    }

    #[test]
    fn enum_values_convert_to_sets() {
        assert_eq!(
            AgentCapabilitySet::from(v1::AgentCapabilities::ReportsHealth),
            AgentCapabilitySet::REPORTS_HEALTH
        );
        assert!(ServerCapabilitySet::from(v1::ServerCapabilities::Unspecified).is_empty());
    }
}
