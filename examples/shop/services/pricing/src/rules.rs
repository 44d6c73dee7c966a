//! The pricing rules, as pure integer arithmetic on cents.
//!
//! Prices are VAT-exclusive. For a validated request, in this order:
//!
//! 1. **Line**: `gross = unit_price_cents × quantity`. If the request
//!    contains 3 or more of the same SKU (quantities of repeated lines
//!    added up), each of that SKU's lines gets 10 % off:
//!    `line discount = round(gross × 10 / 100)`,
//!    `line_total = gross − line discount`.
//! 2. **Subtotal**: `subtotal = Σ line_total`.
//! 3. **Order discount**: if `subtotal ≥ 10 000` cents (100.00), a further
//!    `round(subtotal × 5 / 100)` off the order.
//! 4. **Coupon**: `WELCOME10` takes `round((subtotal − order discount) × 10 / 100)`
//!    off what remains after step 3.
//! 5. **VAT**: `tax = round(net × 20 / 100)` where
//!    `net = subtotal − order discount − coupon discount`.
//! 6. **Total**: `total = net + tax`.
//!
//! The quote's `discount_cents` is steps 3 + 4 (order-level); line discounts
//! are already inside `subtotal_cents`, so
//! `total_cents = subtotal_cents − discount_cents + tax_cents` always holds.
//!
//! `round` is half-up on the exact quotient, once per step, in integers:
//! `round(x × p / 100) = (x × p + 50) / 100` for `x ≥ 0`. Inputs are bounded
//! by validation (≤ 100 lines, quantity ≤ 1000, unit price ≤ 10⁸ cents), so
//! every intermediate fits an `i64` with room to spare.

use std::collections::HashMap;

use serde::Serialize;

/// Quantity of one SKU from which its lines get the volume discount.
pub const VOLUME_MIN_QUANTITY: i64 = 3;
/// Volume discount, percent.
pub const VOLUME_PERCENT: i64 = 10;
/// Subtotal from which the order discount applies, cents.
pub const ORDER_THRESHOLD_CENTS: i64 = 10_000;
/// Order discount, percent.
pub const ORDER_PERCENT: i64 = 5;
/// VAT, percent.
pub const VAT_PERCENT: i64 = 20;

/// A coupon the shop honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coupon {
    /// Its code, upper case.
    pub code: &'static str,
    /// Percent off the order after the order discount.
    pub percent: i64,
}

/// Every coupon there is.
pub const COUPONS: &[Coupon] = &[Coupon {
    code: "WELCOME10",
    percent: 10,
}];

/// Looks a coupon up, ignoring case and surrounding spaces.
pub fn coupon(code: &str) -> Option<Coupon> {
    let code = code.trim();
    COUPONS
        .iter()
        .copied()
        .find(|c| c.code.eq_ignore_ascii_case(code))
}

/// One validated input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// One priced line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub gross_cents: i64,
    pub discount_cents: i64,
    pub line_total_cents: i64,
}

/// The priced order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub lines: Vec<Line>,
    pub subtotal_cents: i64,
    /// Order-level discount (step 3).
    pub order_discount_cents: i64,
    /// Coupon discount (step 4).
    pub coupon_discount_cents: i64,
    /// Steps 3 + 4.
    pub discount_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
}

/// `round(x × percent / 100)`, half-up, for `x ≥ 0`.
pub fn percent_of(x: i64, percent: i64) -> i64 {
    (x * percent + 50) / 100
}

/// Prices validated `items` with an optional known coupon.
pub fn price(items: &[Item], coupon: Option<Coupon>) -> Totals {
    let mut per_sku: HashMap<&str, i64> = HashMap::new();
    for item in items {
        *per_sku.entry(item.sku.as_str()).or_default() += item.quantity;
    }
    let lines: Vec<Line> = items
        .iter()
        .map(|item| {
            let gross = item.unit_price_cents * item.quantity;
            let volume =
                per_sku.get(item.sku.as_str()).copied().unwrap_or(0) >= VOLUME_MIN_QUANTITY;
            let discount = if volume {
                percent_of(gross, VOLUME_PERCENT)
            } else {
                0
            };
            Line {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price_cents: item.unit_price_cents,
                gross_cents: gross,
                discount_cents: discount,
                line_total_cents: gross - discount,
            }
        })
        .collect();
    let subtotal: i64 = lines.iter().map(|l| l.line_total_cents).sum();
    let order_discount = if subtotal >= ORDER_THRESHOLD_CENTS {
        percent_of(subtotal, ORDER_PERCENT)
    } else {
        0
    };
    let coupon_discount = coupon.map_or(0, |c| percent_of(subtotal - order_discount, c.percent));
    let discount = order_discount + coupon_discount;
    let net = subtotal - discount;
    let tax = percent_of(net, VAT_PERCENT);
    Totals {
        lines,
        subtotal_cents: subtotal,
        order_discount_cents: order_discount,
        coupon_discount_cents: coupon_discount,
        discount_cents: discount,
        tax_cents: tax,
        total_cents: net + tax,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, quantity: i64, unit: i64) -> Item {
        Item {
            sku: sku.into(),
            quantity,
            unit_price_cents: unit,
        }
    }

    #[test]
    fn rounding_is_half_up() {
        assert_eq!(percent_of(5, 10), 1); // 0.5 → 1
        assert_eq!(percent_of(4, 10), 0); // 0.4 → 0
        assert_eq!(percent_of(15, 10), 2); // 1.5 → 2
        assert_eq!(percent_of(1349, 10), 135); // 134.9 → 135
        assert_eq!(percent_of(0, 20), 0);
    }

    #[test]
    fn no_discount_below_thresholds() {
        let t = price(&[item("a", 2, 450)], None);
        assert_eq!(t.lines[0].gross_cents, 900);
        assert_eq!(t.lines[0].discount_cents, 0);
        assert_eq!(t.subtotal_cents, 900);
        assert_eq!(t.discount_cents, 0);
        assert_eq!(t.tax_cents, 180);
        assert_eq!(t.total_cents, 1080);
    }

    #[test]
    fn three_of_a_sku_take_ten_percent_off_its_lines() {
        let t = price(&[item("a", 3, 333), item("b", 1, 100)], None);
        // 999 gross, 99.9 → 100 off
        assert_eq!(t.lines[0].discount_cents, 100);
        assert_eq!(t.lines[0].line_total_cents, 899);
        assert_eq!(t.lines[1].discount_cents, 0);
        assert_eq!(t.subtotal_cents, 999);
        // 999 × 20 % = 199.8 → 200
        assert_eq!(t.tax_cents, 200);
        assert_eq!(t.total_cents, 1199);
    }

    #[test]
    fn repeated_lines_of_a_sku_count_together() {
        let t = price(&[item("a", 2, 1000), item("a", 1, 1000)], None);
        assert_eq!(t.lines[0].discount_cents, 200);
        assert_eq!(t.lines[1].discount_cents, 100);
        assert_eq!(t.subtotal_cents, 2700);
    }

    #[test]
    fn order_discount_from_one_hundred_euros_after_line_discounts() {
        // 10 000 exactly: applies.
        let t = price(&[item("g", 1, 10_000)], None);
        assert_eq!(t.order_discount_cents, 500);
        assert_eq!(t.tax_cents, 1900);
        assert_eq!(t.total_cents, 11_400);
        // 3 × 3700 = 11 100 gross, 1110 off → 9990 < 10 000: no order discount.
        let t = price(&[item("x", 3, 3700)], None);
        assert_eq!(t.subtotal_cents, 9990);
        assert_eq!(t.order_discount_cents, 0);
    }

    #[test]
    fn coupon_applies_after_the_order_discount() {
        let welcome = coupon(" welcome10 ");
        assert!(welcome.is_some());
        let t = price(&[item("g", 1, 12_345)], welcome);
        // 5 % of 12 345 = 617.25 → 617; remaining 11 728
        assert_eq!(t.order_discount_cents, 617);
        // 10 % of 11 728 = 1172.8 → 1173
        assert_eq!(t.coupon_discount_cents, 1173);
        assert_eq!(t.discount_cents, 1790);
        // net 10 555; 20 % = 2111
        assert_eq!(t.tax_cents, 2111);
        assert_eq!(t.total_cents, 12_666);
        assert_eq!(
            t.total_cents,
            t.subtotal_cents - t.discount_cents + t.tax_cents
        );
    }

    #[test]
    fn unknown_coupons_are_not_found() {
        assert_eq!(coupon("FREE"), None);
        assert_eq!(coupon(""), None);
    }

    #[test]
    fn largest_valid_order_does_not_overflow() {
        let items: Vec<Item> = (0..100)
            .map(|i| item(&format!("s{i}"), 1000, 100_000_000))
            .collect();
        let t = price(&items, coupon("WELCOME10"));
        assert!(t.total_cents > 0);
    }

    #[test]
    fn free_items_cost_nothing() {
        let t = price(&[item("free", 5, 0)], None);
        assert_eq!(t.total_cents, 0);
    }
}
