//! The redemption arithmetic, apart from where its numbers are kept: the reserve made of the
//! running sums, a melt quote's terms, and what holding, settling and releasing a melt do to
//! the sums. The ledger (`ledger.rs`) keeps the sums in the mint's database and calls these.
//!
//! The rate is `redeemable msat / outstanding ehash`, where redeemable is the matured rewards
//! less the pool's fee less what was paid out, and outstanding is every ehash quoted that has
//! not failed its audit (PENDING ones too: they may yet be paid) less what melts took. A melt
//! in flight changes neither side: its sats are held against the capacity (`available`) only,
//! so it never raises the rate for anyone, and its failure changes nothing. A melt is paid at
//! its quote's rate or, if the rate fell since (more ehash owed, rewards fell), at the lower
//! rate as long as the ehash the quote asked for still covers the invoice and its fee reserve;
//! it takes its ehash at that rate, rounded up, so had nothing changed while it was in flight,
//! the rate left for the others does not fall by it. Rounding always favours the ehash that
//! stays.

use serde::{Deserialize, Serialize};

/// The ehash fee reserve of a quote carries this margin (parts per million of the amount) for
/// the rate to fall between the quote and the melt (shares keep coming); what the melt does not
/// take comes back as change.
pub const RATE_MARGIN_PPM: u64 = 20_000;

/// The running sums the reserve is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// ehash of every quote the mint made from a share record.
    pub quoted_ehash: u64,
    /// ehash of the quotes whose template was found invalid (never to be paid).
    pub failed_ehash: u64,
    /// ehash completed melts took (amount and routing fee at each quote's rate, rounded up).
    pub melted_ehash: u64,
    /// msat paid out over Lightning, routing fees included.
    pub redeemed_msat: u64,
    /// msat held for payments in flight.
    pub held_msat: u64,
    /// Completed redemptions.
    pub payments: u64,
}

/// The reserve as the mint sees it now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reserve {
    /// Tip height the rewards were counted at.
    pub height: u64,
    /// Coinbase outputs to the payout address at least 100 blocks deep on the active chain,
    /// sats.
    pub matured_sat: u64,
    /// The pool's fee on them, sats (rounded up).
    pub pool_fee_sat: u64,
    /// Paid out over Lightning (amount + routing fees), msat.
    pub redeemed_msat: u64,
    /// Held for payments in flight, msat.
    pub held_msat: u64,
    /// Redemptions paid (one Lightning payment each).
    pub payments: u64,
    /// What the outstanding ehash is worth: matured less fee less redeemed, msat (the rate's
    /// numerator; holds do not change it).
    pub redeemable_msat: u64,
    /// What new melts may still take now: redeemable less held, msat.
    pub available_msat: u64,
    /// ehash owed or maybe owed: every quote not failed (PENDING, PAID, minted) less what
    /// melts took; the ehash of melts in flight is in it until they complete.
    pub outstanding_ehash: u64,
}

impl Tally {
    /// ehash owed or maybe owed.
    pub fn outstanding_ehash(&self) -> u64 {
        self.quoted_ehash
            .saturating_sub(self.failed_ehash)
            .saturating_sub(self.melted_ehash)
    }

    /// The reserve, with `matured_sat` rewards at `height` and a fee of `pool_fee_ppm`.
    pub fn reserve(&self, height: u64, matured_sat: u64, pool_fee_ppm: u64) -> Reserve {
        // Rounded up: the pool's fee never gives a fraction away.
        let pool_fee_sat =
            u64::try_from((u128::from(matured_sat) * u128::from(pool_fee_ppm)).div_ceil(1_000_000))
                .unwrap_or(u64::MAX)
                .min(matured_sat);
        let redeemable_msat = (matured_sat - pool_fee_sat)
            .saturating_mul(1000)
            .saturating_sub(self.redeemed_msat);
        Reserve {
            height,
            matured_sat,
            pool_fee_sat,
            redeemed_msat: self.redeemed_msat,
            held_msat: self.held_msat,
            payments: self.payments,
            redeemable_msat,
            available_msat: redeemable_msat.saturating_sub(self.held_msat),
            outstanding_ehash: self.outstanding_ehash(),
        }
    }

    /// A melt's payment is on its way: `msat` held.
    pub fn hold(&mut self, msat: u64) {
        self.held_msat = self.held_msat.saturating_add(msat);
    }

    /// A held payment failed for good: its hold goes, nothing else changes.
    pub fn release(&mut self, held_msat: u64) {
        self.held_msat = self.held_msat.saturating_sub(held_msat);
    }

    /// A held payment completed: `spent_msat` left, the melt took `ehash`.
    pub fn settle(&mut self, held_msat: u64, spent_msat: u64, ehash: u64) {
        self.held_msat = self.held_msat.saturating_sub(held_msat);
        self.redeemed_msat = self.redeemed_msat.saturating_add(spent_msat);
        self.melted_ehash = self.melted_ehash.saturating_add(ehash);
        self.payments += 1;
    }
}

impl Reserve {
    /// msat per ehash (0 when nothing is outstanding), for people; quotes use the exact
    /// fraction.
    pub fn rate_msat_per_ehash(&self) -> f64 {
        if self.outstanding_ehash == 0 {
            0.0
        } else {
            self.redeemable_msat as f64 / self.outstanding_ehash as f64
        }
    }

    /// The terms an invoice of `invoice_msat` gets now, with a routing fee reserve of
    /// `fee_reserve_msat`, or why the pool cannot redeem it (what an operator reads).
    pub fn terms(
        &self,
        invoice_msat: u64,
        fee_reserve_msat: u64,
        payment_hash: String,
        now_secs: u64,
    ) -> Result<QuoteTerms, String> {
        if invoice_msat == 0 {
            return Err("the invoice has no amount: ask for one with an amount".into());
        }
        if self.outstanding_ehash == 0 {
            return Err("no ehash is outstanding: nothing to redeem".into());
        }
        let needed = invoice_msat.saturating_add(fee_reserve_msat);
        if needed > self.available_msat {
            return Err(format!(
                "{}: the invoice asks {} sat plus a {} sat routing fee reserve, the pool can pay at most {} sat now (matured rewards {} sat - pool fee {} sat - redeemed {} sat - held {} sat)",
                super::OVER_RESERVE,
                invoice_msat / 1000,
                fee_reserve_msat.div_ceil(1000),
                self.available_msat / 1000,
                self.matured_sat,
                self.pool_fee_sat,
                self.redeemed_msat / 1000,
                self.held_msat / 1000,
            ));
        }
        let (rate_msat, rate_ehash) = (self.redeemable_msat, self.outstanding_ehash);
        let amount_ehash = to_ehash(invoice_msat, rate_msat, rate_ehash);
        let margin = u64::try_from(
            (u128::from(amount_ehash) * u128::from(RATE_MARGIN_PPM)).div_ceil(1_000_000),
        )
        .unwrap_or(u64::MAX);
        Ok(QuoteTerms {
            invoice_msat,
            fee_reserve_msat,
            rate_msat,
            rate_ehash,
            amount_ehash,
            fee_ehash: to_ehash(fee_reserve_msat, rate_msat, rate_ehash).saturating_add(margin),
            payment_hash,
            created_at: now_secs,
        })
    }
}

/// The fixed terms of one melt quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuoteTerms {
    /// The invoice's amount, msat.
    pub invoice_msat: u64,
    /// Routing fee reserve, msat.
    pub fee_reserve_msat: u64,
    /// The rate's numerator: redeemable msat when quoted.
    pub rate_msat: u64,
    /// The rate's denominator: ehash outstanding when quoted.
    pub rate_ehash: u64,
    /// ehash the invoice costs.
    pub amount_ehash: u64,
    /// ehash the fee reserve costs, with [`RATE_MARGIN_PPM`] of the amount on top.
    pub fee_ehash: u64,
    /// The invoice's payment hash (hex).
    pub payment_hash: String,
    /// When the quote was made (Unix seconds).
    pub created_at: u64,
}

impl QuoteTerms {
    /// msat converted to ehash at the quote's rate, rounded up.
    pub fn to_ehash(&self, msat: u64) -> u64 {
        to_ehash(msat, self.rate_msat, self.rate_ehash)
    }

    /// What a completed payment that spent `spent_msat` takes: at the quote's rate, rounded
    /// up, never more than the inputs the quote asked for.
    pub fn melted_ehash(&self, spent_msat: u64) -> u64 {
        self.to_ehash(spent_msat)
            .min(self.amount_ehash.saturating_add(self.fee_ehash))
    }

    /// msat held while the payment is in flight: the invoice and its routing fee reserve.
    pub fn held_msat(&self) -> u64 {
        self.invoice_msat.saturating_add(self.fee_reserve_msat)
    }

    /// The terms a melt quoted as `self` is paid on with `reserve`: the quote's own, or the
    /// reserve's lower rate as long as the ehash the quote asked for (amount and fee reserve)
    /// still covers the invoice and its fee reserve at it; `None` when it does not (the rate
    /// fell too far: a new quote is needed).
    pub fn payable_on(&self, reserve: &Reserve) -> Option<QuoteTerms> {
        if !self.rate_above(reserve) {
            return Some(self.clone());
        }
        let (rate_msat, rate_ehash) = (reserve.redeemable_msat, reserve.outstanding_ehash);
        let needed = to_ehash(self.held_msat(), rate_msat, rate_ehash);
        (needed <= self.amount_ehash.saturating_add(self.fee_ehash)).then(|| QuoteTerms {
            rate_msat,
            rate_ehash,
            ..self.clone()
        })
    }

    /// Whether `reserve` pays less per ehash than this quote.
    pub fn rate_above(&self, reserve: &Reserve) -> bool {
        u128::from(reserve.redeemable_msat) * u128::from(self.rate_ehash)
            < u128::from(self.rate_msat) * u128::from(reserve.outstanding_ehash)
    }

    /// msat the invoice's ehash is worth at the quote's rate beyond the invoice: what rounding
    /// up to whole ehash costs the operator (it stays with the other holders).
    pub fn rounding_loss_msat(&self) -> u64 {
        let worth = u128::from(self.amount_ehash) * u128::from(self.rate_msat)
            / u128::from(self.rate_ehash.max(1));
        u64::try_from(worth.saturating_sub(u128::from(self.invoice_msat))).unwrap_or(u64::MAX)
    }

    /// [`Self::rounding_loss_msat`] in parts per million of what the invoice's ehash is worth.
    pub fn rounding_loss_ppm(&self) -> u64 {
        let worth = u128::from(self.amount_ehash) * u128::from(self.rate_msat)
            / u128::from(self.rate_ehash.max(1));
        if worth == 0 {
            return 0;
        }
        u64::try_from(u128::from(self.rounding_loss_msat()) * 1_000_000 / worth).unwrap_or(u64::MAX)
    }
}

/// msat converted at `rate_msat / rate_ehash`, rounded up (the pool never gives away a part).
pub fn to_ehash(msat: u64, rate_msat: u64, rate_ehash: u64) -> u64 {
    if rate_msat == 0 {
        return u64::MAX;
    }
    let n = u128::from(msat) * u128::from(rate_ehash);
    u64::try_from(n.div_ceil(u128::from(rate_msat))).unwrap_or(u64::MAX)
}

/// msat of the routing fee reserve for an invoice of `invoice_msat`.
pub fn fee_reserve_msat(invoice_msat: u64, ppm: u64, min_msat: u64) -> u64 {
    let fee = u128::from(invoice_msat) * u128::from(ppm) / 1_000_000;
    u64::try_from(fee).unwrap_or(u64::MAX).max(min_msat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn conversion_rounds_up_and_never_divides_by_zero() {
        // 1000 msat per ehash.
        assert_eq!(to_ehash(1000, 10_000, 10), 1);
        assert_eq!(to_ehash(1001, 10_000, 10), 2);
        assert_eq!(to_ehash(0, 10_000, 10), 0);
        assert_eq!(to_ehash(1, 0, 10), u64::MAX);
        // 150 BTC over 3 ehash: 10,000 sat costs one whole ehash.
        assert_eq!(to_ehash(10_000_000, 15_000_000_000_000, 3), 1);
    }

    #[test]
    fn the_review_example_no_longer_raises_the_rate() {
        // 150 BTC over 10 ehash; a 1-sat melt holds 2 ehash worth while in flight.
        let mut t = Tally {
            quoted_ehash: 10,
            ..Tally::default()
        };
        let before = t.reserve(300, 150 * 100_000_000, 0);
        let first = before.terms(1000, 10_000, "a".into(), 0).unwrap();
        t.hold(first.held_msat());
        let during = t.reserve(300, 150 * 100_000_000, 0);
        assert_eq!(
            (during.redeemable_msat, during.outstanding_ehash),
            (before.redeemable_msat, before.outstanding_ehash),
            "a melt in flight leaves the rate alone"
        );
        t.release(first.held_msat());
        assert_eq!(t.reserve(300, 150 * 100_000_000, 0), before);
    }

    #[test]
    fn a_quote_is_paid_at_a_lower_rate_while_its_inputs_cover_it() {
        // 1000 msat per ehash when quoted: 100,000 msat and a 10,000 msat reserve cost 110,
        // and the 2 % margin on the amount 2 more.
        let then = Reserve {
            redeemable_msat: 1_000_000,
            available_msat: 1_000_000,
            outstanding_ehash: 1000,
            ..Reserve::default()
        };
        let t = then.terms(100_000, 10_000, "h".into(), 0).unwrap();
        assert_eq!((t.amount_ehash, t.fee_ehash), (100, 12));
        // Unchanged: the quote's own terms.
        assert_eq!(t.payable_on(&then), Some(t.clone()));
        // 5 % more owed: 110,000 msat now cost 115.5 ehash, more than the 112 given.
        let diluted = Reserve {
            outstanding_ehash: 1050,
            ..then.clone()
        };
        assert_eq!(t.payable_on(&diluted), None);
        // A tenth of a percent more: still covered, paid at the lower rate.
        let slightly = Reserve {
            outstanding_ehash: 1001,
            ..then.clone()
        };
        let p = t.payable_on(&slightly).unwrap();
        assert_eq!((p.rate_msat, p.rate_ehash), (1_000_000, 1001));
        assert!(p.melted_ehash(110_000) <= 112);
        assert!(p.melted_ehash(110_000) >= t.melted_ehash(110_000));
        // A higher rate (rewards matured since): the quote's own, lower, rate stands.
        let richer = Reserve {
            redeemable_msat: 2_000_000,
            ..then.clone()
        };
        assert_eq!(t.payable_on(&richer), Some(t));
    }

    #[test]
    fn rounding_loss_is_what_the_ehash_is_worth_beyond_the_invoice() {
        // 1000 sat per ehash: a 1500 sat invoice costs 2 ehash worth 2000 sat.
        let r = Reserve {
            redeemable_msat: 100_000_000,
            available_msat: 100_000_000,
            outstanding_ehash: 100,
            ..Reserve::default()
        };
        let t = r.terms(1_500_000, 0, "h".into(), 0).unwrap();
        assert_eq!(t.amount_ehash, 2);
        assert_eq!(t.rounding_loss_msat(), 500_000);
        assert_eq!(t.rounding_loss_ppm(), 250_000);
        let exact = r.terms(2_000_000, 0, "h".into(), 0).unwrap();
        assert_eq!(exact.rounding_loss_msat(), 0);
    }

    /// One event of a random history.
    #[derive(Debug, Clone)]
    enum Op {
        /// A share's quote (PENDING until audited).
        Quote(u64),
        /// A template found invalid fails this much of the pending ehash.
        Fail(u64),
        /// A template found valid pays this much of the pending ehash (it can be minted, then
        /// melted).
        Pay(u64),
        /// More rewards mature.
        Mature(u64),
        /// A melt quoted, then held, for an invoice of this many msat.
        Melt(u64),
        /// The oldest melt in flight completes, spending this share (per mille) of its
        /// routing fee reserve.
        Complete(u16),
        /// The oldest melt in flight fails.
        Drop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..1 << 20).prop_map(Op::Quote),
            (1u64..1 << 16).prop_map(Op::Fail),
            (1u64..1 << 20).prop_map(Op::Pay),
            (1u64..10_000_000).prop_map(Op::Mature),
            (1u64..2_000_000_000).prop_map(Op::Melt),
            (0u16..=1000).prop_map(Op::Complete),
            Just(Op::Drop),
        ]
    }

    /// `a` pays no more per ehash than `b`, compared exactly.
    fn no_higher(a: &Reserve, b: &Reserve) -> bool {
        u128::from(a.redeemable_msat) * u128::from(b.outstanding_ehash)
            <= u128::from(b.redeemable_msat) * u128::from(a.outstanding_ehash)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// For random histories of quotes, failures, rewards and melts: no melt in flight, nor
        /// its failure, raises the rate anyone else gets; a completed melt never lowers it; the
        /// sats paid and held never exceed the matured rewards minus the fee; the ehash melts
        /// take never exceed what was outstanding.
        #[test]
        fn no_history_shifts_money_between_holders(ops in proptest::collection::vec(op(), 1..80)) {
            let fee_ppm = 20_000;
            let mut t = Tally::default();
            let mut matured = 0u64;
            let mut pending = 0u64;
            // Paid ehash not melted or in a melt: what holders can put into a melt.
            let mut spendable = 0u64;
            let mut flight: std::collections::VecDeque<QuoteTerms> = Default::default();
            for op in ops {
                let before = t.reserve(1, matured, fee_ppm);
                match op {
                    Op::Quote(a) => { t.quoted_ehash += a; pending += a; }
                    Op::Fail(a) => {
                        let a = a.min(pending);
                        t.failed_ehash += a;
                        pending -= a;
                    }
                    Op::Pay(a) => {
                        let a = a.min(pending);
                        pending -= a;
                        spendable += a;
                    }
                    Op::Mature(s) => matured += s,
                    Op::Melt(invoice) => {
                        let fee = fee_reserve_msat(invoice, 10_000, 10_000);
                        let terms = before
                            .terms(invoice, fee, "h".into(), 0)
                            .ok()
                            .filter(|t| t.amount_ehash + t.fee_ehash <= spendable);
                        if let Some(terms) = terms {
                            spendable -= terms.amount_ehash + terms.fee_ehash;
                            // The ledger's own check at payment time.
                            prop_assert!(!terms.rate_above(&before));
                            prop_assert!(terms.held_msat() <= before.available_msat);
                            t.hold(terms.held_msat());
                            let during = t.reserve(1, matured, fee_ppm);
                            prop_assert!(no_higher(&during, &before), "in flight raised the rate");
                            prop_assert!(no_higher(&before, &during), "in flight lowered the rate");
                            flight.push_back(terms);
                        }
                    }
                    Op::Complete(per_mille) => {
                        if let Some(terms) = flight.pop_front() {
                            let spent = terms.invoice_msat
                                + terms.fee_reserve_msat * u64::from(per_mille) / 1000;
                            let ehash = terms.melted_ehash(spent);
                            prop_assert!(ehash <= before.outstanding_ehash);
                            // It takes the ehash its quote priced the sats at, rounded up (or
                            // all the inputs it gave): never sats for fewer ehash than quoted.
                            let inputs = terms.amount_ehash + terms.fee_ehash;
                            prop_assert!(ehash == inputs
                                || u128::from(ehash) * u128::from(terms.rate_msat)
                                    >= u128::from(spent) * u128::from(terms.rate_ehash));
                            t.settle(terms.held_msat(), spent, ehash);
                            // The change comes back to its holder.
                            spendable += inputs - ehash;
                            let after = t.reserve(1, matured, fee_ppm);
                            // Nothing happened between its hold and now: the others' rate
                            // does not fall by it.
                            if flight.is_empty() && terms.rate_msat == before.redeemable_msat
                                && terms.rate_ehash == before.outstanding_ehash {
                                prop_assert!(no_higher(&before, &after),
                                    "a completed melt lowered the others' rate");
                            }
                        }
                    }
                    Op::Drop => {
                        if let Some(terms) = flight.pop_front() {
                            t.release(terms.held_msat());
                            spendable += terms.amount_ehash + terms.fee_ehash;
                            let after = t.reserve(1, matured, fee_ppm);
                            prop_assert!(no_higher(&after, &before), "a failed melt raised the rate");
                        }
                    }
                }
                let r = t.reserve(1, matured, fee_ppm);
                let ceiling = u128::from(matured - r.pool_fee_sat) * 1000;
                prop_assert!(u128::from(t.redeemed_msat) + u128::from(t.held_msat) <= ceiling,
                    "paid {} and held {} msat of {ceiling}", t.redeemed_msat, t.held_msat);
            }
        }
    }
}
