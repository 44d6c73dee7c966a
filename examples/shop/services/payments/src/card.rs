//! The simulated card processor: deterministic test cards, so the saga's
//! success and failure paths can be exercised on purpose.
//!
//! Nothing here talks to a real payment network. The card numbers are the
//! well-known public test numbers; the "payment token" orders passes along
//! is the number itself because there is no vault to tokenise it in. A real
//! shop would receive an opaque token from its payment provider's widget and
//! never see a card number at all.

/// Always declines: the issuer said no.
pub const DECLINED: &str = "4000000000000002";
/// Declines for lack of funds.
pub const INSUFFICIENT_FUNDS: &str = "4000000000009995";

/// Why a charge was declined, as published in `payment.failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// The test card that always declines.
    CardDeclined,
    /// The test card without funds.
    InsufficientFunds,
    /// Not a card number at all: wrong length, not digits, or a failing
    /// Luhn check digit.
    InvalidCard,
    /// A negative amount: nothing a processor would charge (or refund
    /// through a charge).
    InvalidAmount,
    /// Not an ISO 4217 code (three upper-case letters).
    InvalidCurrency,
    /// The order was cancelled before its charge came due (see
    /// `store::cancel`): never sent to the processor.
    OrderCancelled,
}

impl Decline {
    /// The reason code carried in events and stored with the charge.
    pub fn code(self) -> &'static str {
        match self {
            Decline::CardDeclined => "card_declined",
            Decline::InsufficientFunds => "insufficient_funds",
            Decline::InvalidCard => "invalid_card",
            Decline::InvalidAmount => "invalid_amount",
            Decline::InvalidCurrency => "invalid_currency",
            Decline::OrderCancelled => "order_cancelled",
        }
    }
}

/// The card number's digits, spaces removed; `None` if anything else is in
/// it or it is not 12 to 19 digits long (the lengths card schemes issue).
pub fn digits(card: &str) -> Option<String> {
    let digits: String = card.chars().filter(|c| *c != ' ').collect();
    let ok = (12..=19).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit());
    ok.then_some(digits)
}

/// The last four digits, safe to store and show; `None` for a malformed
/// number.
pub fn last4(card: &str) -> Option<String> {
    digits(card).map(|d| d[d.len() - 4..].to_owned())
}

/// The Luhn (mod 10) check every card number's last digit satisfies.
/// `digits` must be ASCII digits only.
pub fn luhn_valid(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            match i % 2 {
                0 => d,
                _ if d * 2 > 9 => d * 2 - 9,
                _ => d * 2,
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// Charges `card`: `Ok(())` when it goes through, the decline otherwise.
/// The same card always gets the same answer.
pub fn authorize(card: &str) -> Result<(), Decline> {
    let Some(digits) = digits(card) else {
        return Err(Decline::InvalidCard);
    };
    match digits.as_str() {
        DECLINED => Err(Decline::CardDeclined),
        INSUFFICIENT_FUNDS => Err(Decline::InsufficientFunds),
        d if luhn_valid(d) => Ok(()),
        _ => Err(Decline::InvalidCard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_real_test_numbers_and_rejects_a_changed_digit() {
        for good in [
            "4242424242424242",
            "5555555555554444",
            "378282246310005",
            "4000000000000002",
            "4000000000009995",
            "79927398713",
        ] {
            assert!(luhn_valid(good), "{good}");
        }
        for bad in ["4242424242424241", "4242424242424252", "79927398710", ""] {
            assert!(!luhn_valid(bad), "{bad}");
        }
    }

    #[test]
    fn test_cards_answer_deterministically() {
        assert_eq!(authorize("4242 4242 4242 4242"), Ok(()));
        assert_eq!(authorize("5555555555554444"), Ok(()));
        assert_eq!(authorize("4000 0000 0000 0002"), Err(Decline::CardDeclined));
        assert_eq!(
            authorize("4000 0000 0000 9995"),
            Err(Decline::InsufficientFunds)
        );
        // Twice, same answer.
        assert_eq!(
            authorize("4000 0000 0000 0002"),
            authorize("4000000000000002")
        );
    }

    #[test]
    fn malformed_or_failing_luhn_is_invalid_card() {
        for bad in [
            "4242 4242 4242 4241",
            "4242-4242-4242-4242",
            "1234",
            "",
            "42424242424242424242",
            "abcd abcd abcd abcd",
        ] {
            assert_eq!(authorize(bad), Err(Decline::InvalidCard), "{bad:?}");
        }
        assert_eq!(Decline::InvalidCard.code(), "invalid_card");
        assert_eq!(Decline::CardDeclined.code(), "card_declined");
        assert_eq!(Decline::InsufficientFunds.code(), "insufficient_funds");
    }

    #[test]
    fn last4_is_all_that_is_kept() {
        assert_eq!(last4("4242 4242 4242 4242").as_deref(), Some("4242"));
        assert_eq!(last4("4000 0000 0000 9995").as_deref(), Some("9995"));
        assert_eq!(last4("12"), None);
    }
}
