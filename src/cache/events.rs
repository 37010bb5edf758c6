//! Invalidation events: what every write publishes on `<namespace>:v1:events`
//! and every instance receives (near caches drop what they name).

use serde::{Deserialize, Serialize};

use super::{Cache, Kind, redis::Delivery};

/// What the event subscription delivers (see `Cache::receive_events`).
#[derive(Debug)]
pub enum EventFeed {
    /// Subscribed (again): every event from now on arrives.
    Subscribed,
    /// The subscription dropped: events may be missed until `Subscribed`.
    Lost,
    Event(Event),
}

/// An invalidation, as published to every instance on `<namespace>:v1:events`
/// (JSON, so that other services can read it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event: EventName,
    pub id: uuid::Uuid,
    /// Product categories whose lists changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

macro_rules! event_names {
    ($($variant:ident = $name:literal, $kind:ident;)*) => {
        /// What an event says happened, `<entity>.<change>` as the triggers
        /// name it (see the migrations); parsed once, where it is read.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventName {
            $($variant,)*
            /// A name this service does not know: another publisher's, on
            /// the shared channel. Received and counted, never published.
            Other,
        }

        impl EventName {
            /// The name on the wire, and the `event` label of metrics.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(EventName::$variant => $name,)*
                    EventName::Other => "other",
                }
            }

            pub fn parse(name: &str) -> EventName {
                match name {
                    $($name => EventName::$variant,)*
                    _ => EventName::Other,
                }
            }

            /// The kind of entity the event is about; `None` for `Other`.
            pub const fn entity(self) -> Option<Kind> {
                match self {
                    $(EventName::$variant => Some(Kind::$kind),)*
                    EventName::Other => None,
                }
            }
        }
    };
}

event_names! {
    UserCreated = "user.created", User;
    UserUpdated = "user.updated", User;
    UserDeleted = "user.deleted", User;
    UserTruncated = "user.truncated", User;
    UserRetired = "user.retired", User;
    ProductCreated = "product.created", Product;
    ProductUpdated = "product.updated", Product;
    ProductPriceChanged = "product.price.changed", Product;
    ProductMoved = "product.moved", Product;
    ProductDeleted = "product.deleted", Product;
    ProductTruncated = "product.truncated", Product;
    ProductRetired = "product.retired", Product;
}

impl EventName {
    /// A TRUNCATE of the entity's table.
    pub fn is_truncation(self) -> bool {
        matches!(self, EventName::UserTruncated | EventName::ProductTruncated)
    }

    /// Whether every entity of the kind changed: a TRUNCATE, or a backlog retired.
    pub fn covers_every_entity(self) -> bool {
        self.is_truncation() || matches!(self, EventName::UserRetired | EventName::ProductRetired)
    }

    /// The event that says every cached `kind` was retired (a new key epoch).
    pub fn retired(kind: Kind) -> EventName {
        match kind {
            Kind::User => EventName::UserRetired,
            Kind::Product | Kind::List => EventName::ProductRetired,
        }
    }
}

impl Serialize for EventName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(EventName::parse(&name))
    }
}

impl Cache {
    /// Receives every instance's invalidation events, forever, counting them;
    /// also says when the subscription is up and when it dropped.
    pub async fn receive_events(&self, mut on: impl FnMut(EventFeed)) {
        self.core
            .redis
            .subscribe(&self.core.keys.events(), |delivery| match delivery {
                Delivery::Subscribed => on(EventFeed::Subscribed),
                Delivery::Lost => on(EventFeed::Lost),
                Delivery::Message(payload) => match serde_json::from_slice::<Event>(payload) {
                    Ok(event) => {
                        metrics::counter!("readthrough_events_received_total", "event" => event.event.as_str())
                            .increment(1);
                        on(EventFeed::Event(event));
                    }
                    Err(error) => tracing::warn!(%error, "ignoring a malformed invalidation event"),
                },
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_round_trip_and_unknown_ones_are_other() {
        for name in [
            "user.created",
            "product.price.changed",
            "user.truncated",
            "product.retired",
        ] {
            assert_eq!(EventName::parse(name).as_str(), name);
        }
        assert_eq!(EventName::parse("x".repeat(100).as_str()), EventName::Other);
        assert_eq!(EventName::parse("product.price.changed").entity(), Some(Kind::Product));
        let event: Event =
            serde_json::from_str(r#"{"event":"attacker.x","id":"00000000-0000-0000-0000-000000000000"}"#).unwrap();
        assert_eq!(event.event, EventName::Other);
        let json = serde_json::to_string(&Event {
            event: EventName::UserUpdated,
            id: uuid::Uuid::nil(),
            categories: Vec::new(),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"event":"user.updated","id":"00000000-0000-0000-0000-000000000000"}"#
        );
    }
}
