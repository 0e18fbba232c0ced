//! The mint's payment backend for (`ehash`, `mining_share`). Quotes are never created
//! through it: the mint writes them from the pool's share records and credits them itself
//! once their template is audited (see `store.rs`), so every request that would create or pay
//! a quote from outside is refused here.

use std::collections::HashMap;
use std::pin::Pin;

use async_trait::async_trait;
use cdk_common::payment::{
    CreateIncomingPaymentResponse, Error, Event, IncomingPaymentOptions, MakePaymentResponse,
    MintPayment, OutgoingPaymentOptions, PaymentIdentifier, PaymentQuoteResponse, SettingsResponse,
    WaitPaymentResponse,
};
use cdk_common::CurrencyUnit;
use futures::Stream;

/// Name of the custom payment method.
pub const METHOD: &str = "mining_share";
/// Name of the custom unit.
pub const UNIT: &str = "ehash";

/// Why an outside request cannot create a `mining_share` quote.
pub const REFUSE_QUOTE: &str = "mining_share quotes are created only from the pool's share records (ehash:shares); the mint does not take them over HTTP";

/// The backend.
#[derive(Debug, Default)]
pub struct ShareBackend;

#[async_trait]
impl MintPayment for ShareBackend {
    type Err = Error;

    async fn get_settings(&self) -> Result<SettingsResponse, Self::Err> {
        Ok(SettingsResponse {
            unit: UNIT.into(),
            bolt11: None,
            bolt12: None,
            onchain: None,
            custom: HashMap::from([(METHOD.to_string(), "{}".to_string())]),
        })
    }

    async fn create_incoming_payment_request(
        &self,
        _options: IncomingPaymentOptions,
    ) -> Result<CreateIncomingPaymentResponse, Self::Err> {
        Err(Error::Custom(REFUSE_QUOTE.into()))
    }

    async fn get_payment_quote(
        &self,
        _unit: &CurrencyUnit,
        _options: OutgoingPaymentOptions,
    ) -> Result<PaymentQuoteResponse, Self::Err> {
        Err(Error::UnsupportedPaymentOption)
    }

    async fn make_payment(
        &self,
        _unit: &CurrencyUnit,
        _options: OutgoingPaymentOptions,
    ) -> Result<MakePaymentResponse, Self::Err> {
        Err(Error::UnsupportedPaymentOption)
    }

    async fn wait_payment_event(
        &self,
    ) -> Result<Pin<Box<dyn Stream<Item = Event> + Send>>, Self::Err> {
        // Payments are credited by the mint's settlement in its own transactions.
        Ok(Box::pin(futures::stream::pending()))
    }

    fn is_payment_event_stream_active(&self) -> bool {
        true
    }

    fn cancel_payment_event_stream(&self) {}

    async fn check_incoming_payment_status(
        &self,
        _payment_identifier: &PaymentIdentifier,
    ) -> Result<Vec<WaitPaymentResponse>, Self::Err> {
        // Nothing is ever paid from outside: an unaudited quote stays unpaid. (cdk does not
        // even ask for the quotes settlement creates: `store::BACKEND_CHECK_DONE_FOR_GOOD`. A
        // backend that ever reports payments must drop that.)
        Ok(Vec::new())
    }

    async fn check_outgoing_payment(
        &self,
        _payment_identifier: &PaymentIdentifier,
    ) -> Result<MakePaymentResponse, Self::Err> {
        Err(Error::UnsupportedPaymentOption)
    }
}
