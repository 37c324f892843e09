//! `GetXdbcTypeInfo`: the SQL types Ember's SQL (DataFusion's dialect)
//! takes in casts and literals, for the ODBC/JDBC-style clients and BI tools
//! that ask before they write SQL.

use std::sync::LazyLock;

use arrow_flight::sql::metadata::{XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder};
use arrow_flight::sql::{Nullable, Searchable, XdbcDataType, XdbcDatetimeSubcode};
use tonic::Status;

static TYPES: LazyLock<Result<XdbcTypeInfoData, String>> = LazyLock::new(|| {
    use XdbcDataType as T;
    let mut b = XdbcTypeInfoDataBuilder::new();
    let number = |name: &str, data_type: T, size: i32| XdbcTypeInfo {
        num_prec_radix: Some(10),
        unsigned_attribute: Some(false),
        searchable: Searchable::Basic,
        ..info(name, data_type, size)
    };
    let quoted = |name: &str, data_type: T, size: i32, prefix: &str| XdbcTypeInfo {
        literal_prefix: Some(prefix.to_string()),
        literal_suffix: Some("'".to_string()),
        case_sensitive: true,
        searchable: Searchable::Full,
        ..info(name, data_type, size)
    };
    let datetime =
        |name: &str, data_type: T, subcode: XdbcDatetimeSubcode, size: i32| XdbcTypeInfo {
            sql_data_type: T::XdbcDatetime,
            datetime_subcode: Some(subcode),
            ..quoted(name, data_type, size, &format!("{name} '"))
        };
    for t in [
        info("BOOLEAN", T::XdbcBit, 1),
        number("TINYINT", T::XdbcTinyint, 3),
        number("SMALLINT", T::XdbcSmallint, 5),
        number("INTEGER", T::XdbcInteger, 10),
        number("BIGINT", T::XdbcBigint, 19),
        number("REAL", T::XdbcReal, 24),
        number("DOUBLE", T::XdbcDouble, 53),
        XdbcTypeInfo {
            create_params: Some(vec!["precision".into(), "scale".into()]),
            fixed_prec_scale: true,
            minimum_scale: Some(0),
            maximum_scale: Some(38),
            ..number("DECIMAL", T::XdbcDecimal, 38)
        },
        quoted("VARCHAR", T::XdbcVarchar, i32::MAX, "'"),
        quoted("BYTEA", T::XdbcVarbinary, i32::MAX, "X'"),
        datetime(
            "DATE",
            T::XdbcDate,
            XdbcDatetimeSubcode::XdbcSubcodeYear,
            10,
        ),
        datetime(
            "TIME",
            T::XdbcTime,
            XdbcDatetimeSubcode::XdbcSubcodeTime,
            18,
        ),
        datetime(
            "TIMESTAMP",
            T::XdbcTimestamp,
            XdbcDatetimeSubcode::XdbcSubcodeTimestamp,
            35,
        ),
        quoted("INTERVAL", T::XdbcInterval, i32::MAX, "INTERVAL '"),
    ] {
        b.append(t);
    }
    b.build().map_err(|e| e.to_string())
});

fn info(name: &str, data_type: XdbcDataType, size: i32) -> XdbcTypeInfo {
    XdbcTypeInfo {
        type_name: name.to_string(),
        data_type,
        column_size: Some(size),
        literal_prefix: None,
        literal_suffix: None,
        create_params: None,
        nullable: Nullable::NullabilityNullable,
        case_sensitive: false,
        searchable: Searchable::Basic,
        unsigned_attribute: None,
        fixed_prec_scale: false,
        auto_increment: Some(false),
        local_type_name: Some(name.to_string()),
        minimum_scale: None,
        maximum_scale: None,
        sql_data_type: data_type,
        datetime_subcode: None,
        num_prec_radix: None,
        interval_precision: None,
    }
}

pub fn types() -> Result<&'static XdbcTypeInfoData, Status> {
    TYPES
        .as_ref()
        .map_err(|e| Status::internal(format!("type info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_listed_once_and_filters_by_data_type() {
        let all = types().unwrap().record_batch(None).unwrap();
        assert_eq!(all.num_rows(), 14);
        let bigint = types()
            .unwrap()
            .record_batch(XdbcDataType::XdbcBigint as i32)
            .unwrap();
        assert_eq!(bigint.num_rows(), 1);
    }
}
